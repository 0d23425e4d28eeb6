#!/usr/bin/env bash
# The whole GPU comparison in one run (issue 32): ours against diffusers on one CUDA device, fp16, SD 1.5 shapes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default benchmarks/results/gpu; about 6 minutes on one H200
#
# Steps, each bounded by `timeout` so that one slow step cannot eat the rest (a step that fails or times out is
# logged and the script goes on):
#   1. sync check: our pipeline's sampling loop under torch.cuda.set_sync_debug_mode, counting host
#      synchronisations per step (goal: none inside the loop).
#   2. benchmarks/unet.py: U-Net and VAE decoder forward, 512 px, fp16.
#   3. benchmarks/pipeline.py: the whole pipeline, 512 px, 30 steps, eager, then with torch.compile.
#   4. benchmarks/train.py: a training step, SD 1.5 U-Net, batch 4, 512 px, fp16 autocast.
#   5. benchmarks/speed.py: diffusers default / best (fp16 + scheduler + DeepCache) against ours default / best.
#   6. benchmarks/caching.py: our feature cache against the DeepCache package.
# Every report lands in OUT_DIR (and a log of the whole run), and OUT_DIR is packed into gpu-results.tar.gz.
# Needs diffusers (and DeepCache for 5-6) importable; PYTHONPATH may point at wheels unpacked elsewhere.
set -u
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-run.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'EOF' 2>&1 | tee "$LOG"
import torch, diffusers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

step() {  # step NAME SECONDS COMMAND...   (ONLY="name ..." runs those steps alone)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step sync-check 120 python3 benchmarks/gpu_sync_check.py --out "$OUT_DIR"
step unet 120 python3 benchmarks/unet.py --device cuda --dtype float16 --reps 10 --out "$OUT_DIR"
step pipeline-eager 150 python3 benchmarks/pipeline.py --device cuda --dtype float16 --steps 30 --sizes 512 --reps 5 \
  --peak-tflops 989 --out "$OUT_DIR/eager"
step train 120 python3 benchmarks/train.py --device cuda --dtype float16 --unet ldm/configs/unet-sd15.yaml --batch 4 \
  --latent 64 --steps 10 --out "$OUT_DIR"
step speed 240 python3 benchmarks/speed.py --device cuda --skip-bundled --size 512 --reps 5 --out "$OUT_DIR" \
  ${SPEED_ARGS:-}
step caching 150 python3 benchmarks/caching.py --device cuda --dtype float16 --out "$OUT_DIR"
step pipeline-compiled 300 python3 benchmarks/pipeline.py --device cuda --dtype float16 --steps 30 --sizes 512 \
  --reps 5 --compile --peak-tflops 989 --out "$OUT_DIR/compiled"
tar czf "$(dirname "$OUT_DIR")/gpu-results.tar.gz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"
echo "packed $(dirname "$OUT_DIR")/gpu-results.tar.gz" | tee -a "$LOG"
