#!/usr/bin/env bash
# Every GPU check still pending for the memory (#7) and multi-GPU (#8) issues, in ONE device call
# (~8–9 min on an H100; each step has its own time limit and its own log, so one failure or timeout
# does not lose the others). Prepare on the CPU machine first:
#
#   bash ../shared/device/fetch-wheels.sh tomli-w imagehash PyWavelets prodigyopt \
#       einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types \
#       typing-inspection                               # + diffusers/bitsandbytes/datasets
#   DS_BUILD_OPS=0 pip wheel -q --no-deps deepspeed -w .whl   # pure-Python DeepSpeed (~2 MB)
#   bash benchmarks/gpu_session.sh --dry-run                  # CPU: checks the script itself
#
# and, for the side-by-side against the diffusers reference script (step 3), put diffusers'
# examples/text_to_image/train_text_to_image_lora.py at .ref/ (git-ignored; not in the wheel):
#
#   mkdir -p .ref && cp /path/to/diffusers/examples/text_to_image/train_text_to_image_lora.py .ref/
#
# then one device `run`: command "bash benchmarks/gpu_session.sh", carry [".whl", ".ref"],
# timeout_s 590 (the #7 steps come first: a cut-off run loses only the FSDP/DeepSpeed checks).
# Results under $OUT: summary.txt (one line per step: exit code, seconds), <step>.log,
# gpu_check.json (peak memory / s/it / planner per architecture, FLUX with and without
# train.offload_activations). Record them in BENCHMARKS.md with the device name.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if [ -d .whl ] && [ "$DRY" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

step() {  # step NAME LIMIT_S CMD... : run with a time limit, log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and \
torch.cuda.get_device_name(0))" | tee -a "$OUT/summary.txt"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  step families 300 python3 benchmarks/gpu_check.py --tiny --only families
else
  DEVICE=cuda
  # 1. Real SD1.5 / SDXL / FLUX.1-dev NF4 (with and without offloaded checkpoint inputs):
  #    peak allocated memory against the targets (<= 4 / 8 / 10 GB) and the planner.
  step families 330 python3 benchmarks/gpu_check.py --only families
  # 2. The gpu-marked tests: CLI on CUDA fp16/bf16 + 8-bit AdamW; NF4/int8 QLoRA through the
  #    CLI (exercises the quantized denoiser parked in host memory while the encoders cache).
  step pytest_gpu 150 python3 -m pytest -q -m gpu -p no:cacheprovider
fi
[ -f gpu_check.json ] && cp gpu_check.json "$OUT/" 2>/dev/null

# 3. lorakit vs the diffusers reference LoRA script, real SD1.5 architecture (random fp16
#    weights), 512 px, fp16, same steps: s/it, whole command and max_memory_allocated each.
if [ -f .ref/train_text_to_image_lora.py ]; then
  REF=(python3 benchmarks/reference_script.py --reference .ref/train_text_to_image_lora.py
    --rounds 1 --steps 20 --json "$OUT/reference.json")
  if [ "$DRY" = 1 ]; then
    step reference 300 "${REF[@]}" --steps 8
  else
    step reference 200 "${REF[@]}" --arch sd15 --device cuda --mixed-precision fp16 \
      --resolution 512
  fi
else
  echo "no .ref/train_text_to_image_lora.py: reference step skipped" | tee -a "$OUT/summary.txt"
fi
# 4. FSDP2 and DeepSpeed ZeRO-2 through the shipped accelerate configs, one process each, tiny
#    model, 4 steps with a checkpoint at step 2 (DeepSpeed: no checkpoints, lorakit refuses them).
TINY=(samples/brand --preset tiny-cpu --set "train.device='$DEVICE'"
  --set "train.optimizer='adamw'" --set "sample.every=0" --num-processes 1)
step fsdp 120 python3 -m lorakit train "${TINY[@]}" --out "$OUT/fsdp-run" --steps 4 \
  --set train.save_every=2 --accelerate-config presets/accelerate/fsdp.yaml
step fsdp_resume 120 python3 -m lorakit train "${TINY[@]}" --out "$OUT/fsdp-run" \
  --set train.save_every=2 --steps 6 --resume latest \
  --accelerate-config presets/accelerate/fsdp.yaml
if python3 -c "import deepspeed" >/dev/null 2>&1; then
  step deepspeed 150 python3 -m lorakit train "${TINY[@]}" --out "$OUT/deepspeed-run" --steps 4 \
    --set train.save_every=0 --accelerate-config presets/accelerate/deepspeed-zero2.yaml
else
  echo "deepspeed not importable: step skipped" | tee -a "$OUT/summary.txt"
fi
ls "$OUT"/fsdp-run "$OUT"/deepspeed-run 2>/dev/null | tee -a "$OUT/summary.txt"
rm -rf "$OUT"/fsdp-run/cache "$OUT"/deepspeed-run/cache "$OUT"/*/checkpoints
