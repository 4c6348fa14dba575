#!/usr/bin/env bash
# The GPU measurements in one command, on a machine with one GPU, jax with CUDA and PyTorch
# (no internet, no TensorFlow needed), run from a checkout that holds the reference code
# (experiments/fetch_reference.sh, done beforehand where there is internet):
#
#   experiments/device_check.sh            # ~8 minutes; results in $OUT (default runs/device_check)
#   experiments/device_check.sh --dry      # the same path on any machine, tiny, nothing timed
#
# Writes $OUT/speed.json and $OUT/speed.md: for SSKD, HSAKD, KD and CRD on resnet32x4 ->
# resnet8x4 and wrn_40_2 -> wrn_16_2 at batch 64, in float32 and bfloat16 (jaxkd's
# half_precision; the reference under torch.autocast), side by side with the reference's own
# step (experiments/speed_vs_reference.py): images/s of each, their ratio, achieved TFLOP/s
# against the measured matmul peak of each dtype, peak device memory, compile time, and the
# input workers one host core each would need to keep jaxkd's step fed. Also $OUT/machine.txt
# (nvidia-smi, versions). Cases that would start after 7 minutes are listed as not measured.
#
# PYTHON: the interpreter with jax (default python3); TORCH_PYTHON: the one with torch
# (default: PYTHON).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
TORCH_PYTHON="${TORCH_PYTHON:-$PYTHON}"
OUT="${OUT:-runs/device_check}"
mkdir -p "$OUT"

dry=()
if [[ "${1:-}" == "--dry" ]]; then
  dry=(--dry)
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry]" >&2
  exit 2
fi

{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1
  "$TORCH_PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 || true
} > "$OUT/machine.txt"

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" experiments/speed_vs_reference.py \
  --methods=sskd,hsakd,kd,crd --pairs=resnet32x4:resnet8x4,wrn_40_2:wrn_16_2 --batch=64 \
  --dtypes=float32,bfloat16 --rounds=3 --warmup=3 --steps=20 --input-seconds=1 \
  --deadline-s=420 --torch-python="$TORCH_PYTHON" \
  --out="$OUT/speed.json" --markdown="$OUT/speed.md" "${dry[@]}"
echo "wrote $OUT/speed.json, $OUT/speed.md, $OUT/machine.txt"
