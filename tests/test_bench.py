"""`python -m mixer_jax.bench` runs and prints well-formed numbers. Speed goals live in the
benchmarks themselves: nothing here is timed."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--variant=Mu/4", "--image_size=16", "--batch=8", "--num_classes=10", "--steps=2", "--json"]


def bench(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, "-m", "mixer_jax.bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("extra", [[], ["--accum_steps=2", "--mesh=1,2,1", "--scan", "--remat=full"]])
def test_bench_train(extra):
    r = bench("train", *TINY, *extra)
    for key in ("images_per_s", "tflops", "matmul_tflops", "mfu_vs_matmul", "compile_s", "peak_memory_bytes"):
        assert positive(r[key]), (key, r)
    assert r["device"] and r["mfu_vs_matmul"] == pytest.approx(r["tflops"] / r["matmul_tflops"])


def test_bench_infer():
    r = bench("infer", *TINY)
    assert positive(r["images_per_s"]) and positive(r["tflops"]) and positive(r["compile_s"]), r


def test_bench_data():
    r = bench("data", "--synthetic_jpeg=48", "--images=64", "--batch=16", "--workers=2", "--json")
    assert r["image_shape"] == [224, 224, 3] and r["images"] >= 64, r
    baselines = ("pil_decode_images_per_cpu_s", "pil_loop_images_per_cpu_s", "per_core_vs_pil_loop")
    for key in ("images_per_s", "images_per_s_per_core", "images_per_cpu_s", *baselines):
        assert positive(r[key]), (key, r)
