.PHONY: install test lint format demo

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
