#!/usr/bin/env bash
# Train-step throughput of mixer_jax vs timm's eager PyTorch Mixer on this CPU, measured back to back
# (alternating, ROUNDS times each), same model, batch and optimizer family (AdamW, clipping at 1).
#
#   benchmarks/compare_timm.sh [VARIANT=S/16] [BATCH=32] [ROUNDS=3] [ACCUM=1] [PRECISION=float32]
#
# PRECISION=mixed runs the matmuls in bfloat16 on both sides, with float32 parameters and LayerNorm:
# mixer_jax's model.matmul_dtype=bfloat16 against torch.autocast(bfloat16). ACCUM > 1 splits each batch into microbatches whose gradients are summed before the one AdamW
# update (the same optimizer step on the same batch; the smaller working set suits CPU caches).
#
# mixer_jax runs with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (README, Benchmarks) unless GLIBC_TUNABLES
# is set; timm runs with the caller's environment (huge pages slowed it: 7.3 against 10.3 images/s).
#
# TIMM_PYTHON: a Python with torch and timm (default: a venv made once under /tmp/timm_venv).
# MIXER_PYTHON: the Python that runs mixer_jax (default: python).
# MIXER_FLAGS: more flags for mixer_jax.bench, e.g. "--steps_per_call=4" (default: none).
set -euo pipefail
variant=${1:-S/16}
batch=${2:-32}
rounds=${3:-3}
accum=${4:-1}
precision=${5:-float32}
case "$precision" in
  float32) timm_flags=(--autocast=none); mixer_flags=(--matmul_dtype=float32) ;;
  mixed) timm_flags=(--autocast=bfloat16); mixer_flags=(--matmul_dtype=bfloat16) ;;
  *) echo "PRECISION must be float32 or mixed, got $precision" >&2; exit 2 ;;
esac
timm_model="mixer_$(echo "$variant" | tr 'A-Z' 'a-z' | tr -d '/')_224"
mixer_python=${MIXER_PYTHON:-python}
timm_python=${TIMM_PYTHON:-/tmp/timm_venv/bin/python}
if [[ ! -x "$timm_python" ]]; then
  python3 -m venv /tmp/timm_venv
  /tmp/timm_venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm --extra-index-url https://download.pytorch.org/whl/cpu
fi
cd "$(dirname "$0")/.."
for round in $(seq "$rounds"); do
  "$timm_python" benchmarks/timm_train.py --model="$timm_model" --batch="$batch" --steps=5 "${timm_flags[@]}"
  GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1} "$mixer_python" -m mixer_jax.bench train --variant="$variant" --batch="$batch" --accum_steps="$accum" \
    --scan=false --steps=5 "${mixer_flags[@]}" ${MIXER_FLAGS:-} --json 2>/dev/null
done | "$mixer_python" -c '
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
timm = statistics.median(r["images_per_s"] for r in rows if "framework" in r)
ours = statistics.median(r["images_per_s"] for r in rows if "framework" not in r)
print(json.dumps({"timm_images_per_s": timm, "mixer_jax_images_per_s": ours, "speedup": ours / timm}))
'
