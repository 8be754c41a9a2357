"""`python -m mixer_jax.bench` runs and prints well-formed numbers. Speed goals live in the
benchmarks themselves: nothing here is timed."""

import json
import math
import os
import subprocess
import sys

import pytest

from mixer_jax import bench as bench_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--variant=Mu/4", "--image_size=16", "--batch=8", "--num_classes=10", "--steps=2", "--json"]


def bench(*args, **env_vars):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **env_vars)
    result = subprocess.run(
        [sys.executable, "-m", "mixer_jax.bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            *("--accum_steps=2", "--steps_per_call=2", "--mesh=1,2,1", "--scan", "--remat=full"),
            *("--matmuls=fused", "--gelu_backward=saved"),
        ],
    ],
)
def test_bench_train(extra, tmp_path):
    # With JAX's persistent cache switched on for every compile, `compile_s` still times a compile:
    # bench neither loads from the cache nor writes to it.
    cache = tmp_path / "cache"
    r = bench(
        "train", *TINY, *extra, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    assert not cache.exists() or not any(cache.iterdir())
    for key in ("images_per_s", "tflops", "matmul_tflops", "mfu_vs_matmul", "compile_s", "peak_memory_bytes"):
        assert positive(r[key]), (key, r)
    assert r["device"] and r["mfu_vs_matmul"] == pytest.approx(r["tflops"] / r["matmul_tflops"])
    assert r["host_page_faults_per_step"] >= 0
    if "--matmuls=fused" in extra:  # The fused channel MLPs recompute whatever the flag says.
        assert r["gelu_backward"] == "saved (channel MLPs: recompute)" and r["matmuls"] == "fused"
    else:
        assert r["gelu_backward"] in ("saved", "recompute")
    assert r["layer_norm_backward"] in ("saved", "recompute")


def test_bench_infer(tmp_path):
    r = bench("infer", *TINY, f"--profile_dir={tmp_path}")
    assert positive(r["images_per_s"]) and positive(r["tflops"]) and positive(r["compile_s"]), r
    assert "ENTRY" in (tmp_path / "step.hlo.txt").read_text()
    assert (tmp_path / "ops.tsv").read_text().startswith("ms_per_step\tshare")
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


def _event(metadata_id, start_ms, ms):
    return f"events {{ metadata_id: {metadata_id} offset_ps: {int(start_ms * 1e9)} duration_ps: {int(ms * 1e9)} }}"


def test_device_ops_from_a_trace():
    """The op summary of `--profile_dir`, on traces written by hand: GPU kernels on a stream (matmul
    kernels recognised by name), and a TPU-style "XLA Ops" line whose own categories win."""
    from jax.profiler import ProfileData

    from mixer_jax import bench as bench_lib

    gpu = f"""planes {{
      name: "/device:GPU:0"
      lines {{ name: "Stream #14(Compute,Memset)" {_event(1, 0, 3)} {_event(2, 3, 1)} {_event(1, 5, 3)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "loop_convert_fusion_3" }} }}
    }}
    planes {{ name: "/host:CPU" lines {{ name: "main" {_event(1, 0, 50)} }} }}"""
    ops = bench_lib.device_ops(ProfileData.from_text_proto(gpu))
    assert {name: (op["ns"], op["count"], op["category"]) for name, op in ops.items()} == {
        "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT": (6e6, 2, "matmul"),
        "loop_convert_fusion_3": (1e6, 1, "other"),
    }
    tpu = f"""planes {{
      name: "/device:TPU:0"
      lines {{ name: "XLA Modules" {_event(3, 0, 9)} }}
      lines {{
        name: "XLA Ops"
        events {{ metadata_id: 1 duration_ps: 2000000000 stats {{ metadata_id: 9 str_value: "convolution" }} }}
        {_event(2, 2, 1)}
      }}
      event_metadata {{ key: 1 value {{ id: 1 name: "fusion.7" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "copy.1" }} }}
      event_metadata {{ key: 3 value {{ id: 3 name: "jit_train_step" }} }}
      stat_metadata {{ key: 9 value {{ id: 9 name: "hlo_category" }} }}
    }}"""
    ops = bench_lib.device_ops(ProfileData.from_text_proto(tpu))
    assert {name: (op["ns"], op["category"]) for name, op in ops.items()} == {
        "fusion.7": (2e6, "convolution"),
        "copy.1": (1e6, "other"),
    }


def test_bench_data():
    pp = "decode|inception_crop(224)|flip_lr|value_range(-1,1)|onehot(10)"  # The synthetic set has 10 classes.
    args = ("--synthetic_jpeg=48", "--images=64", "--batch=16", "--workers=2", f"--pp={pp}", "--num_classes=10")
    r = bench("data", *args, "--json")
    assert r["image_shape"] == [224, 224, 3] and r["images"] >= 64 and r["pp"] == pp, r
    baselines = ("pil_decode_images_per_cpu_s", "pil_loop_images_per_cpu_s", "per_core_vs_pil_loop")
    for key in ("images_per_s", "images_per_s_per_core", "images_per_cpu_s", *baselines):
        assert positive(r[key]), (key, r)


def test_bench_data_synthetic_at_the_given_size():
    args = ("--dataset=synthetic", "--image_size=16", "--num_classes=10", "--pp=value_range(-1,1)|onehot(10)")
    r = bench("data", *args, "--images=64", "--json")
    assert r["image_shape"] == [16, 16, 3] and r["images"] >= 64 and positive(r["images_per_s"]), r


def test_spec_peaks_are_per_jax_device():
    """A TPU v3 device is one TensorCore (half a chip); float32 on an H100 runs as TF32."""
    assert bench_lib.spec_peak("TPU v3", "bfloat16") == 61.5e12
    assert bench_lib.spec_peak("TPU v4", "bfloat16") == 275e12
    assert bench_lib.spec_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert bench_lib.spec_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert bench_lib.spec_peak("cpu", "float32") is None
