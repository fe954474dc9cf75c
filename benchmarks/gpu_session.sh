#!/usr/bin/env bash
# The GPU checks still pending, in ONE device call. A session has ~15 device-minutes in all, starts
# included, so one call of <= 600 s is what there is: the default list below is what is still
# PENDING (what earlier sessions measured is in BENCHMARKS.md), in order of priority, with limits
# measured on an H200 (2026-12-04: a lorakit CLI start takes ~25 s there, so nothing is given less
# than 60 s). The whole default list needs more than one call: the first steps matter most, and a
# run cut off at 600 s loses only the last. Each step has its own limit and log, so one failure or
# timeout loses only itself.
#
#   bash benchmarks/gpu_session.sh [--dry-run] [STEP ...]     # default: every pending step
#
# Steps (H200 seconds measured or estimated):
#   offload     FLUX.1-dev NF4 + train.offload_activations, 1024 px: peak vs the <= 10 GB target (~110)
#   block_swap  train.block_swap, same process with/without: real-width Qwen-Image (random bf16
#               weights) 45 blocks streamed at 1024 px (estimated ~150, not yet measured; skipped
#               if the family is not registered), then FLUX.1-dev 20 blocks (est. ~100); s/it and
#               peak allocated, beside musubi-tuner's published 12 GB / 45 blocks
#   real_size   #17: real-width SD3.5 / SDXL / SD1.5 CLI runs, 8-bit AdamW, checkpoint, resume,
#               export --format all, inspect (FLUX passed on 2026-12-04; ~100 each)
#   reference   lorakit vs diffusers' train_text_to_image_lora.py, real SD1.5, 512 px, fp16 (~200)
#   reference_sdxl  vs train_text_to_image_lora_sdxl.py, real SDXL, 1024 px, bf16 (est. ~250)
#   reference_flux  vs train_dreambooth_lora_flux.py, FLUX.1 width (4+8 blocks), 1024 px, lorakit
#               on fp8 and on NF4 bases, the script bf16 (est. ~200 each)
#   reference_compile  the SD1.5 row with torch.compile on both sides (est. ~250)
#   fsdp        FSDP2 train + resume through presets/accelerate/fsdp.yaml, tiny model (~60 each)
#   deepspeed   DeepSpeed ZeRO-2 through presets/accelerate/deepspeed-zero2.yaml (~60)
#   block_swap_fp8  FLUX.1-dev fp8 base, 20 blocks streamed as fp8, with/without (est. ~120)
#   fp8_matmul  FLUX.1-dev fp8 base, model.fp8_matmul on/off, 1024 px, 2 rounds (est. ~120)
#   families    SD1.5 / SDXL / FLUX NF4 rows (done 2026-12-04: BENCHMARKS.md)
#   pytest_gpu  `pytest -m gpu` (passed 2026-12-04)
#
# Prepare on the CPU machine first:
#
#   bash ../shared/device/fetch-wheels.sh tomli-w imagehash PyWavelets prodigyopt \
#       einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types \
#       typing-inspection                               # + diffusers/bitsandbytes/datasets
#   DS_BUILD_OPS=0 pip wheel -q --no-deps deepspeed -w .whl   # pure-Python DeepSpeed (~2 MB)
#   bash benchmarks/gpu_session.sh --dry-run                  # CPU: checks the script itself
#
# and, for the `reference*` steps, put diffusers' example scripts at .ref/ (git-ignored; not in the
# wheel; `fetch` of github:huggingface/diffusers has them):
#
#   mkdir -p .ref && cp /path/to/diffusers/examples/text_to_image/train_text_to_image_lora.py \
#     /path/to/diffusers/examples/text_to_image/train_text_to_image_lora_sdxl.py \
#     /path/to/diffusers/examples/dreambooth/train_dreambooth_lora_flux.py .ref/
#
# then one device `run`: command "bash benchmarks/gpu_session.sh", carry [".whl", ".ref"],
# timeout_s 600. Results under $OUT (the device returns at most 8 files): summary.txt (one line
# per step: exit code, seconds), the JSON reports, and gpu-session.tgz with every log. Record
# them in BENCHMARKS.md with the device name.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1 && shift
STEPS=${*:-offload block_swap real_size reference reference_sdxl reference_flux fsdp deepspeed block_swap_fp8 fp8_matmul reference_compile}
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if [ -d .whl ] && [ "$DRY" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

want() { [[ " $STEPS " == *" $1 "* ]]; }
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
  TINY_FLAG=(--tiny)
else
  DEVICE=cuda
  TINY_FLAG=()
fi
# FLUX.1-dev NF4 (random weights, real architecture) with train.offload_activations: peak
# allocated memory against the <= 10 GB target and the planner (gpu_check.json).
want offload && step offload 150 python3 benchmarks/gpu_check.py "${TINY_FLAG[@]}" --only families \
  --rows=flux+offload
# train.block_swap: s/it and peak allocated with and without streamed blocks, alternating in one
# process (benchmarks/block_swap.py); Qwen-Image's row next to musubi-tuner's 12 GB / 45 blocks.
if want block_swap; then
  SWAP=(python3 benchmarks/block_swap.py "${TINY_FLAG[@]}")
  if python3 -c "import sys; from lorakit.models import FAMILIES; sys.exit('qwen-image' not in FAMILIES)" \
    2>/dev/null; then
    step block_swap_qwen 240 "${SWAP[@]}" --family qwen-image --blocks "$([ "$DRY" = 1 ] && echo 2 \
      || echo 45)" --resolution 1024 --steps 3 --json "$OUT/block_swap_qwen.json"
  else
    echo "qwen-image is not registered: block_swap_qwen skipped" | tee -a "$OUT/summary.txt"
  fi
  step block_swap_flux 150 "${SWAP[@]}" --family flux --blocks "$([ "$DRY" = 1 ] && echo 3 \
    || echo 20)" --resolution 1024 --steps 3 --json "$OUT/block_swap_flux.json"
fi
want families && step families 200 python3 benchmarks/gpu_check.py "${TINY_FLAG[@]}" --only families
want real_size && step real_size 330 python3 benchmarks/real_size_cli.py "${TINY_FLAG[@]}" \
  --families "$([ "$DRY" = 1 ] && echo sd15 || echo sd3,sdxl,sd15)" --deadline 220
want pytest_gpu && [ "$DRY" = 0 ] && step pytest_gpu 90 python3 -m pytest -q -m gpu -p no:cacheprovider

# lorakit vs the diffusers reference LoRA script, real SD1.5 architecture (random fp16 weights),
# 512 px, fp16, same steps: s/it, whole command and max_memory_allocated each.
if want reference && [ -f .ref/train_text_to_image_lora.py ]; then
  REF=(python3 benchmarks/reference_script.py --reference .ref/train_text_to_image_lora.py
    --rounds 1 --json "$OUT/reference.json")
  if [ "$DRY" = 1 ]; then
    step reference 300 "${REF[@]}" --steps 8
  else
    step reference 240 "${REF[@]}" --steps 12 --arch sd15 --device cuda --mixed-precision fp16 \
      --resolution 512
  fi
elif want reference; then
  echo "no .ref/train_text_to_image_lora.py: reference step skipped" | tee -a "$OUT/summary.txt"
fi
# #19's other side-by-side rows: SDXL 1024 bf16 against train_text_to_image_lora_sdxl.py; FLUX.1
# 1024 (real width, 4 double + 8 single blocks) against train_dreambooth_lora_flux.py, lorakit on
# an fp8 and an NF4 base (the script has neither: its side stays bf16); SD1.5 512 fp16 with
# torch.compile on both sides (lorakit train.compile, the reference through accelerate's
# ACCELERATE_DYNAMO_BACKEND). Each: s/it, whole command, peak allocated.
SIDE=(python3 benchmarks/reference_script.py --rounds 1 --device cuda --resolution 1024 --steps 8
  --warmup 2)
[ "$DRY" = 1 ] && SIDE=(python3 benchmarks/reference_script.py --rounds 1 --steps 3 --resolution 64
  --warmup 1)
REAL=(--arch real); [ "$DRY" = 1 ] && REAL=(--arch tiny)
if want reference_sdxl && [ -f .ref/train_text_to_image_lora_sdxl.py ]; then
  step reference_sdxl 300 "${SIDE[@]}" "${REAL[@]}" --family sdxl \
    --reference .ref/train_text_to_image_lora_sdxl.py --json "$OUT/reference_sdxl.json" \
    $([ "$DRY" = 0 ] && echo --mixed-precision bf16 --checkpointing)
fi
if want reference_flux && [ -f .ref/train_dreambooth_lora_flux.py ]; then
  for Q in fp8 nf4; do
    [ "$DRY" = 1 ] && [ "$Q" = nf4 ] && continue  # bitsandbytes NF4 needs CUDA
    step "reference_flux_$Q" 300 "${SIDE[@]}" "${REAL[@]}" --family flux --flux-depth 4,8 \
      --reference .ref/train_dreambooth_lora_flux.py --quantize "$Q" \
      --json "$OUT/reference_flux_$Q.json" \
      $([ "$DRY" = 0 ] && echo --mixed-precision bf16 --checkpointing)
  done
fi
if want reference_compile && [ -f .ref/train_text_to_image_lora.py ] && [ "$DRY" = 0 ]; then
  step reference_compile 300 python3 benchmarks/reference_script.py --rounds 1 --device cuda \
    --reference .ref/train_text_to_image_lora.py --arch sd15 --mixed-precision fp16 \
    --resolution 512 --steps 12 --compile --json "$OUT/reference_compile.json"
fi
# FSDP2 and DeepSpeed ZeRO-2 through the shipped accelerate configs, one process each, tiny
# model, 4 steps with a checkpoint at step 2 (DeepSpeed: no checkpoints, lorakit refuses them).
TINY=(samples/brand --preset tiny-cpu --set "train.device='$DEVICE'"
  --set "train.optimizer='adamw'" --set "sample.every=0" --num-processes 1)
if want fsdp; then
  step fsdp 90 python3 -m lorakit train "${TINY[@]}" --out "$OUT/fsdp-run" --steps 4 \
    --set train.save_every=2 --accelerate-config presets/accelerate/fsdp.yaml
  step fsdp_resume 90 python3 -m lorakit train "${TINY[@]}" --out "$OUT/fsdp-run" \
    --set train.save_every=2 --steps 6 --resume latest \
    --accelerate-config presets/accelerate/fsdp.yaml
fi
if want deepspeed && python3 -c "import deepspeed" >/dev/null 2>&1; then
  step deepspeed 90 python3 -m lorakit train "${TINY[@]}" --out "$OUT/deepspeed-run" --steps 4 \
    --set train.save_every=0 --accelerate-config presets/accelerate/deepspeed-zero2.yaml
elif want deepspeed; then
  echo "deepspeed not importable: step skipped" | tee -a "$OUT/summary.txt"
fi
[ -f gpu_check.json ] && cp gpu_check.json "$OUT/" 2>/dev/null
# fp8 base + block swap (musubi-tuner's --fp8_base --blocks_to_swap): FLUX.1-dev 20 blocks
# streamed as fp8, with/without, same process (benchmarks/block_swap.py --quantize fp8).
want block_swap_fp8 && step block_swap_fp8 150 python3 benchmarks/block_swap.py "${TINY_FLAG[@]}" \
  --family flux --blocks "$([ "$DRY" = 1 ] && echo 3 || echo 20)" --quantize fp8 \
  --resolution 1024 --steps 3 --json "$OUT/block_swap_fp8.json"
# model.fp8_matmul (#19's fp8 fast path): FLUX.1-dev real width on an fp8 base, the layers
# widened before each matmul vs multiplied in fp8, alternating (needs sm_89+: H100/H200 have it).
want fp8_matmul && step fp8_matmul 150 python3 benchmarks/fp8_matmul.py "${TINY_FLAG[@]}" \
  --family flux --resolution 1024 --steps 3 --rounds 2 --json "$OUT/fp8_matmul.json"
ls "$OUT"/fsdp-run "$OUT"/deepspeed-run 2>/dev/null | tee -a "$OUT/summary.txt"
# The device returns at most 8 files: every log and run listing goes into one archive, beside
# summary.txt and the JSON reports.
rm -rf "$OUT"/*-run/cache "$OUT"/*-run/checkpoints
tar czf /tmp/gpu-session.tgz -C "$OUT" . && rm -rf "${OUT:?}"/*-run \
  && find "$OUT" -maxdepth 1 -type f ! -name '*.json' ! -name summary.txt -delete \
  && mv /tmp/gpu-session.tgz "$OUT/"
ls "$OUT"
