"""Benchmarks of the trainer's own step: `python -m mixer_jax.bench train|infer [--flags] [--json]`,
and of the input pipeline: `python -m mixer_jax.bench data [--dataset=NAME | --synthetic_jpeg] [--flags]`.

It times the jitted, sharded train step of `mixer_jax.train` (or the forward pass) on device-resident
random batches, and reports images/s, achieved TFLOP/s from the analytic FLOPs (training = 3x
forward), the same process's large-matmul TFLOP/s at the matmul operand dtype (the practical roofline), the
ratio of the two (MFU vs matmul), the spec peak and MFU against it where the device is known,
compile time, peak memory and the host's page faults per step (on CPU, XLA maps the step's temporary
buffer afresh every call; see README, Benchmarks).

`data` times the training input pipeline (`pipeline.make_train`, grain threads included) and reports
images/s, images/s per core (over min(workers, cores)) and images per CPU-second of the process
(the per-core rate that stays honest on a shared machine), beside two plain single-threaded PIL
loops over the same files, timed in the same process before and after it (`pil_baselines`). The pipeline's final
`value_range` runs in the jitted step, so it is not part of the host's time here.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

_VARIANT = flags.DEFINE_string("variant", "B/16", "Model variant, e.g. B/16.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side in pixels; data: of --dataset=synthetic's images.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "-1,1,1", "Mesh sizes data,fsdp,tensor (-1: the rest).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up call; 0 compiles only.")
_SCAN = flags.DEFINE_bool("scan", False, "Scan over the blocks (nn.scan), as config model.scan_blocks.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy: none, full, dots, dots_no_batch.")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype", "", ["", "float32", "bfloat16"], "Matmul operand dtype, as config model.matmul_dtype ('': --dtype)."
)
_MATMULS = flags.DEFINE_enum(
    "matmuls", "auto", ["auto", "xla", "plain", "fused"], "Matmul layouts, as config model.matmuls."
)
_GELU_BACKWARD = flags.DEFINE_enum(
    "gelu_backward", "auto", ["auto", "saved", "recompute"], "GELU backward pass, as config model.gelu_backward."
)
_LAYER_NORM_BACKWARD = flags.DEFINE_enum(
    "layer_norm_backward",
    "auto",
    ["auto", "saved", "recompute"],
    "LayerNorm backward pass, as config model.layer_norm_backward.",
)
_ACCUM = flags.DEFINE_integer("accum_steps", 1, "Gradient accumulation microbatches.")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", 1, "train: steps per jitted call, as config steps_per_call; --steps are rounded up to calls."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier width; data: the N of onehot(N) in --pp.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    "",
    "train/infer: after timing, trace 3 steps with jax.profiler into this folder and write there the "
    "compiled step's HLO (step.hlo.txt) and the device's XLA ops by time (ops.tsv; GPU and TPU).",
)
_DATASET = flags.DEFINE_string("dataset", "", "data: TFDS name to read (its train split).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "data: TFDS data_dir.")
_PP = flags.DEFINE_string(
    "pp", "decode|inception_crop(224)|flip_lr|value_range(-1,1)|onehot(1000)", "data: training preprocessing."
)
_WORKERS = flags.DEFINE_integer("workers", 1, "data: grain worker threads (input.num_workers).")
_IMAGES = flags.DEFINE_integer("images", 2048, "data: images to time, after one warm-up batch.")
_SYNTHETIC_JPEG = flags.DEFINE_integer(
    "synthetic_jpeg", 0, "data: first write this many 500x375 JPEGs (quality 90) to a temporary dataset and read it."
)

# Dense matrix peak FLOP/s per JAX device, by device kind and matmul operand dtype, from the vendors'
# spec sheets. A GPU is a card; a TPU v3 device is one of a chip's two TensorCores (123 TFLOP/s a
# chip); from v4 on a device is a chip. float32 at JAX's default precision runs on the tensor cores
# as TF32 on A100/H100/H200, so its peak is TF32's (dense, without sparsity).
SPEC_PEAK = {
    ("H100", "bfloat16"): 989.4e12,
    ("H100", "float32"): 494.7e12,
    ("H200", "bfloat16"): 989.4e12,
    ("H200", "float32"): 494.7e12,
    ("A100", "bfloat16"): 312e12,
    ("A100", "float32"): 156e12,
    ("TPU v3", "bfloat16"): 61.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
}


def spec_peak(device_kind: str, dtype: str) -> float | None:
    for (kind, dt), peak in SPEC_PEAK.items():
        if kind.lower() in device_kind.lower() and dt == dtype:
            return peak
    return None


def matmul_flops(dtype: str, size: int | None = None, repeats: int = 5) -> float:
    """The best FLOP/s of a large square matmul on all devices (data parallel), in this process."""
    import jax
    import jax.numpy as jnp

    n = jax.device_count()
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    mesh = jax.sharding.Mesh(jax.devices(), ("d",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    # Random operands: constant ones draw less power, and some chips then clock higher.
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, size, size), dtype), shard) for i in (0, 1))
    f = jax.jit(lambda a, b: jnp.einsum("nij,njk->nik", a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n * size**3 / best


def peak_memory_bytes(compiled: Any) -> int | None:
    """The device allocator's peak where it reports one (GPU, TPU), else XLA's static estimate."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_config():
    from mixer_jax.config import defaults

    c = defaults()
    c.model.update(
        variant=_VARIANT.value,
        image_size=_IMAGE_SIZE.value,
        num_classes=_NUM_CLASSES.value,
        dtype=_DTYPE.value,
        scan_blocks=_SCAN.value,
        remat=_REMAT.value,
        matmul_dtype=_MATMUL_DTYPE.value,
        matmuls=_MATMULS.value,
        gelu_backward=_GELU_BACKWARD.value,
        layer_norm_backward=_LAYER_NORM_BACKWARD.value,
    )
    c.input.pp_train = "value_range(-1,1)"
    c.batch_size, c.accum_steps, c.steps_per_call = _BATCH.value, _ACCUM.value, _STEPS_PER_CALL.value
    c.mesh.update(dict(zip(("data", "fsdp", "tensor"), map(int, _MESH.value.split(",")), strict=True)))
    return c


def run(mode: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mixer_jax import checkpointing, dense_gelu, models, optim, sharding, train
    from mixer_jax import config as config_lib
    from mixer_jax.data import preprocess

    # `compile_s` times a compile: never a load from JAX's persistent cache (JAX_COMPILATION_CACHE_DIR).
    jax.config.update("jax_enable_compilation_cache", False)
    c = bench_config()
    config_lib.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count())
    mesh = sharding.make_mesh(c.mesh)
    model = train.create_model(c)
    tx, schedule = optim.make(c)
    init_state, shardings = train.sharded_init(model, tx, mesh)
    size, n = c.model.image_size, c.model.num_classes
    # A train call takes steps_per_call batches, stacked; inference takes one.
    per_call = c.steps_per_call if mode == "train" else 1
    stack = (per_call,) if mode == "train" else ()

    def make_batch():  # As the pipeline ships them: uint8 images, scaled in the step (`value_range`).
        images = jax.random.randint(jax.random.key(1), (*stack, c.batch_size, size, size, 3), 0, 256, jnp.uint8)
        labels = jax.nn.one_hot(jnp.arange(c.batch_size) % n, n)
        return {"image": images, "labels": jnp.broadcast_to(labels, (*stack, *labels.shape))}

    # Compile against shapes first: the timing is not disturbed by allocating the state.
    abstract_state = checkpointing.abstract_with_shardings(jax.eval_shape(init_state, jax.random.key(0)), shardings)
    batch_sharding = sharding.stacked_batch_sharding(mesh) if stack else sharding.batch_sharding(mesh)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), jax.eval_shape(make_batch)
    )
    if mode == "train":
        step = train.make_train_step(c, model, tx, schedule, mesh, shardings)
        flops_per_image = 6 * models.forward_macs(model)
        abstract_args = (abstract_state, abstract_batch)
    else:
        finish = preprocess.parse(c.input.pp_train).on_device
        step = jax.jit(lambda params, images: model.apply({"params": params}, finish(images)))
        flops_per_image = 2 * models.forward_macs(model)
        abstract_args = (abstract_state.params, abstract_batch["image"])
    t = time.perf_counter()
    compiled = step.lower(*abstract_args).compile()
    compile_s = time.perf_counter() - t

    state = init_state(jax.random.key(0))
    batch = jax.device_put(make_batch(), batch_sharding)
    args = (state, batch) if mode == "train" else (state.params, batch["image"])

    def once(args):
        out = compiled(*args)
        return (out[0], batch) if mode == "train" else args, out

    seconds = images_per_s = tflops = page_faults = None
    if _STEPS.value:  # --steps=0: compile only.
        args, out = once(args)  # Warm-up.
        jax.block_until_ready(out)
        timed_calls = -(-_STEPS.value // per_call)
        faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(timed_calls):
            args, out = once(args)
        jax.block_until_ready(out)
        timed_steps = timed_calls * per_call
        seconds = (time.perf_counter() - t) / timed_steps
        page_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / timed_steps
        images_per_s = c.batch_size / seconds
        tflops = images_per_s * flops_per_image / 1e12
    profiled = (
        profile(_PROFILE_DIR.value, compiled, once, args, steps_per_call=per_call)
        if _PROFILE_DIR.value and _STEPS.value
        else {}
    )
    peak_memory = peak_memory_bytes(compiled)  # The step's, before the matmul below allocates its own.
    operands = _MATMUL_DTYPE.value or _DTYPE.value  # The roofline is the matmuls' own dtype.
    matmul = matmul_flops(operands) / 1e12
    device = jax.devices()[0]
    peak = spec_peak(device.device_kind, operands)
    return {
        "mode": mode,
        "variant": _VARIANT.value,
        "image_size": size,
        "batch": c.batch_size,
        "accum_steps": c.accum_steps,
        "steps_per_call": per_call,
        "dtype": _DTYPE.value,
        "matmul_dtype": operands,
        "matmuls": "plain" if model.plain_matmuls else "fused" if model.fused_gelu else "xla",
        # Whether the channel MLPs ran `dense_gelu`'s kernels (matmuls=fused, where they apply).
        "dense_gelu_kernel": model.fused_gelu
        and dense_gelu.kernel_applies(
            (model.num_tokens, c.batch_size // c.accum_steps, model.hidden_dim),
            (model.hidden_dim, model.channels_mlp_dim),
            model.operand_dtype,
            model.dtype,
        ),
        # The fused channel MLPs always recompute their GELU's derivative; the flag rules the token MLPs.
        "gelu_backward": ("recompute" if model.recompute_gelu else "saved")
        + (" (channel MLPs: recompute)" if model.fused_gelu and not model.recompute_gelu else ""),
        "layer_norm_backward": "recompute" if model.recompute_layer_norm else "saved",
        "mesh": dict(mesh.shape),
        "scan": _SCAN.value,
        "remat": _REMAT.value,
        "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
        "step_s": seconds,
        "images_per_s": images_per_s,
        "tflops": tflops,
        "matmul_tflops": matmul,
        "mfu_vs_matmul": tflops / matmul if tflops else None,
        "spec_peak_tflops": peak / 1e12 * jax.device_count() if peak else None,
        "mfu_vs_spec": tflops / (peak / 1e12 * jax.device_count()) if peak and tflops else None,
        "compile_s": compile_s,
        "peak_memory_bytes": peak_memory,
        "host_page_faults_per_step": page_faults,
        "memory_limit_bytes": (device.memory_stats() or {}).get("bytes_limit"),
        **profiled,
    }


def profile(
    directory: str, compiled: Any, once: Callable, args: Any, calls: int = 3, steps_per_call: int = 1
) -> dict[str, Any]:
    """Traces `calls` calls of `steps_per_call` steps into `directory` (TensorBoard's profile plugin
    or Perfetto read it), writes the compiled HLO beside it and the device's ops by time to ops.tsv.
    Returns the time per step of one device, the part of it in matmul kernels, and the top ops:
    [name, ms per step, share, category]. Times are per device (summed over all, divided by their number)."""
    import glob
    import os

    import jax

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(directory):
        for _ in range(calls):
            args, out = once(args)
        jax.block_until_ready(out)
    traces = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not traces:  # The profiler wrote nothing (it can be unavailable on some platforms).
        return {}
    ops = device_ops(jax.profiler.ProfileData.from_file(max(traces, key=os.path.getmtime)))
    steps = calls * steps_per_call * jax.local_device_count()  # Each device ran every step.
    total = sum(op["ns"] for op in ops.values()) or 1
    rows = sorted(ops.items(), key=lambda kv: -kv[1]["ns"])
    with open(os.path.join(directory, "ops.tsv"), "w") as f:
        f.write("ms_per_step\tshare\tcount_per_step\tname\tcategory\tlong_name\n")
        for name, op in rows:
            long_name = op["long_name"].replace("\t", " ").replace("\n", " ")[:400]
            f.write(f"{op['ns'] / steps / 1e6:.4f}\t{op['ns'] / total:.4f}\t{op['count'] / steps:g}\t{name}\t")
            f.write(f"{op['category']}\t{long_name}\n")
    matmul_ns = sum(op["ns"] for op in ops.values() if op["category"] in MATMUL_CATEGORIES)
    return {
        "device_ms_per_step": total / steps / 1e6 if ops else None,
        "matmul_ms_per_step": matmul_ns / steps / 1e6 if ops else None,
        "top_ops": [[name[:80], op["ns"] / steps / 1e6, op["ns"] / total, op["category"]] for name, op in rows[:15]],
    }


# Kernel names of matrix products on GPU (cuBLAS, CUTLASS, XLA's Triton GEMM fusions) and XLA's
# category for them on TPU.
_MATMUL_KERNEL = re.compile(r"gemm|nvjet|cublas|cutlass|xmma|convolution|splitK", re.IGNORECASE)
MATMUL_CATEGORIES = ("matmul", "convolution")


def device_ops(data: Any) -> dict[str, dict[str, Any]]:
    """Time per op on the accelerators: their "XLA Ops" timelines where the trace has them, else the
    kernels on their streams (GPU). Empty on CPU, which has neither."""
    ops: dict[str, dict[str, Any]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = [line for line in plane.lines if line.name == "XLA Ops"]
        lines = lines or [line for line in plane.lines if line.name.startswith("Stream")]
        for line in lines:
            for event in line.events:
                op = ops.setdefault(event.name, {"ns": 0, "count": 0, "category": "", "long_name": ""})
                op["ns"] += event.duration_ns
                op["count"] += 1
                if op["count"] == 1:
                    stats = dict(event.stats)
                    op["long_name"] = str(stats.get("long_name", ""))
                    category = str(stats.get("hlo_category", ""))
                    op["category"] = category or ("matmul" if _MATMUL_KERNEL.search(event.name) else "other")
    return ops


def run_data() -> dict[str, Any]:
    import contextlib
    import os
    import tempfile

    from mixer_jax.config import defaults
    from mixer_jax.data import pipeline, prepare, preprocess

    c = defaults()
    c.input.dataset, c.input.data_dir = _DATASET.value, _DATA_DIR.value
    c.input.pp_train, c.input.num_workers, c.input.prefetch = _PP.value, _WORKERS.value, 2 * max(1, _WORKERS.value)
    c.batch_size, c.input.eval_split = _BATCH.value, "train"
    # What `onehot(N)` in --pp must agree with, and the side of `--dataset=synthetic`'s images.
    c.model.num_classes, c.model.image_size = _NUM_CLASSES.value, _IMAGE_SIZE.value
    with tempfile.TemporaryDirectory() as tmp:
        if _SYNTHETIC_JPEG.value:
            prepare.synthetic_image_folder(f"{tmp}/images", num_images=_SYNTHETIC_JPEG.value)
            with contextlib.redirect_stdout(sys.stderr):  # TFDS reports the build on stdout.
                prepare.import_image_folder(f"{tmp}/images", "synthetic_jpeg", f"{tmp}/tfds", verbose=False)
            c.input.dataset, c.input.data_dir = "synthetic_jpeg", f"{tmp}/tfds"
        if not c.input.dataset:
            sys.exit("bench data needs --dataset=NAME (with --data_dir) or --synthetic_jpeg=NUM_IMAGES")
        try:
            pipeline.check(c)
        except (pipeline.DatasetError, preprocess.PreprocessError) as e:  # Config keys map to flags here.
            sys.exit(f"bench data: {e} (--pp is input.pp_train, --num_classes model.num_classes)")
        # The baselines run before and after the pipeline (its threads stopped), and their means are
        # reported: a shared machine's speed drifts.
        source = pipeline._source(c, c.input.train_split, raw_image=True)
        before = pil_baselines(source)
        stream = pipeline.make_train(c, process_index=0, process_count=1)
        first = next(stream)  # Warm-up: opens the files and starts the threads.
        images, wall, cpu = 0, time.perf_counter(), time.process_time()
        while images < _IMAGES.value:
            images += len(next(stream)["image"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stream.close()
        after = pil_baselines(source)
        baselines = {k: (v + after[k]) / 2 if v else None for k, v in before.items()}
    cores = min(max(1, _WORKERS.value), os.cpu_count() or 1)
    per_core = images / wall / cores
    return {
        "mode": "data",
        "dataset": c.input.dataset,
        "pp": c.input.pp_train,
        "batch": c.batch_size,
        "image_shape": list(first["image"].shape[1:]),
        "workers": _WORKERS.value,
        "cpu_cores": os.cpu_count(),
        "images": images,
        "seconds": wall,
        "images_per_s": images / wall,
        "images_per_s_per_core": per_core,
        "images_per_cpu_s": images / cpu,
        **baselines,
        **{
            f"per_core_vs_{key.removesuffix('_images_per_cpu_s')}": per_core / rate if rate else None
            for key, rate in baselines.items()
        },
    }


def pil_baselines(source: Any, num_images: int = 256, seconds: float = 1.5) -> dict[str, float | None]:
    """The same machine's baselines, single-threaded plain PIL loops over the same JPEGs:

    - `pil_decode_images_per_cpu_s`: full decode only;
    - `pil_loop_images_per_cpu_s`: full decode, a fixed 80% crop resized bilinearly to 224, a flip
      of half of the images, and float32 in [-1, 1] (what the default train ops do).

    None if the source does not hold encoded images.
    """
    import io

    from PIL import Image

    blobs = [source[i]["image"] for i in range(min(num_images, len(source)))]
    if not blobs or not isinstance(blobs[0], bytes):
        return {"pil_decode_images_per_cpu_s": None, "pil_loop_images_per_cpu_s": None}

    def decode(i: int, blob: bytes) -> None:
        Image.open(io.BytesIO(blob)).convert("RGB")

    def full(i: int, blob: bytes) -> None:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        w, h = image.size
        pixels = np.asarray(image.resize((224, 224), Image.BILINEAR, box=(0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)))
        pixels = pixels[:, ::-1] if i % 2 else pixels
        _ = pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)

    def rate(fn: Callable[[int, bytes], None]) -> float:
        count, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            for i, blob in enumerate(blobs):
                fn(i, blob)
            count += len(blobs)
        return count / (time.process_time() - start)

    return {"pil_decode_images_per_cpu_s": rate(decode), "pil_loop_images_per_cpu_s": rate(full)}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("train", "infer", "data"):
        sys.exit("usage: python -m mixer_jax.bench train|infer|data [--variant=B/16 --batch=32 ...] [--json]")
    result = run_data() if argv[1] == "data" else run(argv[1])
    if _JSON.value:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key == "top_ops":
            for name, ms, share, category in value:
                print(f"{name:>26}: {ms:8.3f} ms/step {share:6.1%}  {category}")
            continue
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


if __name__ == "__main__":
    app.run(main)
