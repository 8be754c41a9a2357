#!/usr/bin/env bash
# B/16 training on one GPU, bfloat16: MFU against the card's dense bf16 peak and its own large matmul,
# batch doubling up to the largest that fits, compile times (B/16 and H/14, scanned), profiles
# of the step with XLA's matmuls and with dense_gelu's kernels, and timm's eager PyTorch B/16 under
# torch.autocast on the same card.
#
#   benchmarks/gpu.sh [OUTDIR=runs/gpu]
#
# VARIANT (B/16), BIG (H/14, compile time only) and BATCH (256, then doubled) change the models.
# Writes OUTDIR/NAME.json (one `bench` result each), OUTDIR/dense_gelu.jsonl (the kernels alone),
# OUTDIR/profile/ and OUTDIR/profile_fused/ (trace, ops.tsv, step.hlo.txt) and prints a table last.
# XLA may take 95% of the card (XLA_PYTHON_CLIENT_MEM_FRACTION).
#
# Measured on H100 80GB HBM3 cards (jax 0.11.2), B/16 bf16, batch 256: 4540-4690 images/s, 343-354
# TFLOP/s, 0.35-0.36 of the dense bf16 spec (989 TFLOP/s), 0.51-0.56 of the same card's 8192^3
# matmul; matmul kernels 29.0 of the 54.6 ms step, GELU, LayerNorm, bias gradients, transposes and
# the optimizer the other 25.3 (README, Benchmarks).
# MIXER_PYTHON: the Python that runs mixer_jax; TIMM_PYTHON: one with torch and timm (skipped if absent).
set -uo pipefail
out=$(realpath -m "${1:-runs/gpu}")  # Relative to the caller's directory.
py=${MIXER_PYTHON:-python}
timm_py=${TIMM_PYTHON:-}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
variant=${VARIANT:-B/16}
big=${BIG:-H/14}
batch=${BATCH:-256}
cd "$(dirname "$0")/.."
mkdir -p "$out"
rm -f "$out"/*.json  # The table lists this run only.

bench() {  # NAME [bench train flags...]: one run, its JSON kept in OUTDIR/NAME.json.
  local name=$1
  shift
  timeout 200 "$py" -m mixer_jax.bench train --json "$@" 2>"$out/$name.log" | tail -1 >"$out/$name.json"
  [[ ${PIPESTATUS[0]} -eq 0 && -s "$out/$name.json" ]] && return
  echo "$name failed:" >&2
  grep -m1 -E "RESOURCE_EXHAUSTED|Error" "$out/$name.log" | cut -c1-300 >&2
  rm -f "$out/$name.json"
  return 1
}

# dense_gelu's kernels alone, every variant beside XLA, each with its error against float32 (B/16's
# channel MLP at batch 256; on H100/H200 only).
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$py" benchmarks/dense_gelu_gpu.py \
  >"$out/dense_gelu.jsonl" 2>"$out/dense_gelu.log" ||
  { echo "dense_gelu_gpu.py failed:" >&2; tail -3 "$out/dense_gelu.log" >&2; }
bf16=(--variant="$variant" --dtype=bfloat16 --steps=10)
bench "bs$batch" "${bf16[@]}" --batch="$batch" --profile_dir="$out/profile"
# The channel MLPs on dense_gelu's Hopper kernels (forward and the GELU's input gradient), profiled
# too, to compare op by op with the default's.
bench "bs${batch}_fused" "${bf16[@]}" --batch="$batch" --matmuls=fused --profile_dir="$out/profile_fused"
# Autodiff's GELU backward pass, which keeps the tanh too (the GPU default keeps only the GELU's input).
bench "bs${batch}_gelu_saved" "${bf16[@]}" --batch="$batch" --gelu_backward=saved
# The LayerNorm backward pass that keeps only the input and row statistics (so far the default for
# float32 activations on CPU only).
bench "bs${batch}_layer_norm_recompute" "${bf16[@]}" --batch="$batch" --layer_norm_backward=recompute
# XLA's rewrite of LayerNorm (forward and backward) into cuDNN's norm kernels, off by default.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cudnn_layer_norm=true" \
  bench "bs${batch}_cudnn_layer_norm" "${bf16[@]}" --batch="$batch"
# Doubling the batch until it no longer fits. XLA:GPU rematerializes to fit large batches, so peak
# memory does not extrapolate: each size is compiled and run.
for n in 2 4 8 16; do
  bench "bs$((n * batch))" "${bf16[@]}" --batch=$((n * batch)) --steps=3 || break
done
bench compile_scan "${bf16[@]}" --batch="$batch" --scan --steps=0
bench compile_scan_big --variant="$big" --dtype=bfloat16 --batch="$batch" --scan --steps=0
if [[ -n "$timm_py" ]]; then
  timm_model="mixer_$(echo "$variant" | tr 'A-Z' 'a-z' | tr -d '/')_224"
  timeout 300 "$timm_py" benchmarks/timm_train.py --model="$timm_model" --batch="$batch" --steps=10 \
    --device=cuda --autocast=bfloat16 >"$out/timm_bs$batch.json" 2>"$out/timm.log" ||
    { tail -3 "$out/timm.log" >&2; rm -f "$out/timm_bs$batch.json"; }
fi
bench "bs${batch}_mixed" --variant="$variant" --matmul_dtype=bfloat16 --batch="$batch" --steps=10

"$py" - "$out" <<'PY'
import glob, json, os, sys
def cell(value, spec):
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

last, profiled = None, []
print(f"{'run':<22}{'img/s':>8}{'TFLOP/s':>9}{'vs matmul':>10}{'vs spec':>9}{'compile s':>10}{'peak GiB':>9}")
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json"), key=os.path.getmtime):
    r = json.load(open(path))
    name = os.path.basename(path)[:-5]
    if "framework" in r:
        print(f"{name:<22}{r['images_per_s']:8.0f}  {r['framework']}, {r['device']}, autocast {r['autocast']}")
        continue
    last = r
    if r.get("device_ms_per_step"):
        profiled.append((name, r["matmul_ms_per_step"], r["device_ms_per_step"], r["step_s"] * 1e3))
    print(f"{name:<22}{cell(r['images_per_s'], '8.0f')}{cell(r['tflops'], '9.1f')}{cell(r['mfu_vs_matmul'], '10.3f')}"
          f"{cell(r['mfu_vs_spec'], '9.3f')}{r['compile_s']:10.1f}{r['peak_memory_bytes'] / 2**30:9.1f}")
for p in profiled:
    print("%s: matmul kernels %.1f of %.1f ms of device time per step (step %.1f ms)" % p)
if last is None:
    sys.exit("no run succeeded: see the .log files")
print(f"{last['variant']}, {last['device']}: large matmul {last['matmul_tflops']:.0f} TFLOP/s, "
      f"spec {last['spec_peak_tflops']} TFLOP/s")
PY
