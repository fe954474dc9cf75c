.PHONY: install test lint format demo bench

install:
	pip install torch==2.13.0 -e '.[test]'

test:
	pytest

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

demo:
	lorakit train samples/brand --preset tiny-cpu --out runs/demo

# CPU benchmarks, as recorded in BENCHMARKS.md. REF=path/to/train_text_to_image_lora.py (from a
# diffusers checkout) adds the side-by-side run against the diffusers reference LoRA script.
bench:
	OMP_WAIT_POLICY=PASSIVE python benchmarks/step_overhead.py --steps 30 --rounds 2
	OMP_WAIT_POLICY=PASSIVE python benchmarks/caching.py --steps 30 --resolution 128
	OMP_WAIT_POLICY=PASSIVE python benchmarks/planner_cpu.py
	OMP_WAIT_POLICY=PASSIVE python benchmarks/prepare.py
	$(if $(REF),OMP_WAIT_POLICY=PASSIVE python benchmarks/reference_script.py --reference $(REF))
