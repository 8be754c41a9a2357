"""The config schema (every key, its type and default) and start-up validation.

Config files under `configs/` start from `defaults()` and change values; they never add keys.
`validate` runs before any compile or data read and raises `ConfigError` with one message that
names the key, the value seen and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from typing import Any

import ml_collections

from mixer_jax import models, weights

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
LOSSES = ("softmax_xent", "sigmoid_xent")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")
MODES = ("train", "eval")
BEST_METRICS = ("eval/accuracy", "eval/loss")


class ConfigError(ValueError):
    """A config that cannot run. The message is meant for the user, as is."""


def defaults() -> ml_collections.ConfigDict:
    """The complete schema. A key not in here is an error; a value of another type too."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128  # Global, over all processes.
    c.accum_steps = 1  # Gradient accumulation: batch_size is split into this many microbatches.
    # Train steps per jitted call (a lax.scan): one dispatch and one temporary buffer for all of them.
    # Lowered to divide log_every, eval_every, checkpoint_every and fewshot.every (train.steps_per_call).
    c.steps_per_call = 1
    c.lr = 1e-3
    c.wd = 1e-4  # Decoupled weight decay (times the learning rate), on the parameters matched by optim.wd_regex.
    c.warmup_steps = 100
    c.schedule = "cosine"
    c.lr_end = 0.0  # Final learning rate, as a fraction of lr.
    c.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables it.
    c.loss = "softmax_xent"
    c.optim = ml_collections.ConfigDict(
        dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, wd_regex=r".*/kernel$", state_dtype="float32")
    )

    c.model = ml_collections.ConfigDict(
        dict(
            variant="B/16",
            image_size=224,
            num_classes=1000,
            dtype="float32",
            param_dtype="float32",
            gelu_approximate=True,
            dropout_rate=0.0,
            stoch_depth=0.0,
            scan_blocks=False,  # One nn.scan over the blocks: compile time independent of depth.
            remat="none",  # none, full, dots, dots_no_batch: activations recomputed in backward.
            # The dense layers' matmul operands ("": dtype); they accumulate in float32. dtype="float32"
            # with matmul_dtype="bfloat16" keeps LayerNorm, GELU and residuals in float32.
            matmul_dtype="",
            # auto, xla, plain, fused: the dense layers' matmul layouts (models.MlpMixer.plain_matmuls);
            # auto picks plain for bfloat16 operands on CPU. fused: XLA's, with each channel MLP's first
            # Dense and GELU one Hopper kernel on a single H100/H200 (models.MlpMixer.fused_gelu).
            matmuls="auto",
            # auto, saved, recompute: the GELUs' backward pass keeps autodiff's intermediates or only
            # the GELU's input (models.MlpMixer.recompute_gelu); auto recomputes on GPU and for
            # float32 matmuls on CPU.
            gelu_backward="auto",
            # auto, saved, recompute: the LayerNorms' backward pass keeps autodiff's intermediates or
            # only the input and row statistics (models.MlpMixer.recompute_layer_norm); auto
            # recomputes for float32 activations on CPU.
            layer_norm_backward="auto",
            # Fine-tuning at image_size = K x this (init.path's resolution): token MLPs widened to
            # K²·D_S and initialised block-diagonally (paper Appendix C). 0: same resolution.
            pretrain_image_size=0,
        )
    )

    c.input = ml_collections.ConfigDict(
        dict(
            dataset="digits",  # A TFDS name, the built-in "digits", or "synthetic" (no data).
            data_dir="",  # "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets.
            train_split="train",
            eval_split="test",
            pp_train="",
            pp_eval="",
            num_workers=2,  # Threads decoding and preprocessing per process.
            prefetch=2,  # Batches prepared ahead of the device step.
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest.

    c.log_every = 50
    c.eval_every = 500  # 0: evaluate only at the end.
    c.checkpoint_every = 500  # 0: checkpoint only at the end.
    c.keep_checkpoints = 3  # The latest N checkpoints are kept...
    c.keep_best = 0  # ...plus the best N by `best_metric` (at evaluation steps).
    c.best_metric = "eval/accuracy"  # Higher is better, unless the name ends in "loss".
    c.allow_config_change = False  # Resume even if the config differs from the checkpoint's.
    c.mode = "train"  # "eval": evaluate a checkpoint (`eval_checkpoint`, default the latest) and stop.
    c.eval_checkpoint = ""  # A workdir, a checkpoints directory, or one step's directory in it.

    # Start a fresh run from weights: an official .npz, timm .safetensors/.pth, or a workdir or
    # checkpoint of ours. new_head: a zero-initialised head for model.num_classes (fine-tuning).
    c.init = ml_collections.ConfigDict(dict(path="", new_head=False))

    # Few-shot linear probes on frozen pre-logits (the paper's transfer proxy), every `every` steps
    # and at the end; "" disables. datasets: comma-separated TFDS NAME or NAME:TRAIN:TEST.
    c.fewshot = ml_collections.ConfigDict(
        dict(datasets="", every=0, shots="1,5,10,25", l2_reg=1024.0, num_seeds=3, max_test_examples=0, pp="")
    )
    return c


def config_args(arg: str | None, file: str, **defaults: str) -> dict[str, str]:
    """A config file's `:key=value,key=value` argument over its `defaults`; an unknown key is an error."""
    args = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in args:
            raise ValueError(f"{file} argument {item!r}: write KEY=VALUE with KEY one of {', '.join(args)}")
        args[key] = value
    return args


def paper_pretraining(variant: str, num_classes: int) -> ml_collections.ConfigDict:
    """The paper's pretraining recipe (Section 3, Appendix B) at 224 px: Adam (0.9, 0.999), batch
    4096, lr 1e-3 with 10k linear warmup steps then linear decay to 0, weight decay 0.1, global-norm
    clipping at 1. Recipes add the data, the augmentation and the length."""
    c = defaults()
    c.model.variant, c.model.image_size, c.model.num_classes = variant, 224, num_classes
    c.input.num_workers = 16  # Threads, each preparing whole batches of this host's share.
    c.batch_size = 4096
    c.optim.name, c.optim.b1, c.optim.b2 = "adamw", 0.9, 0.999
    c.lr, c.wd = 1e-3, 0.1
    c.warmup_steps, c.schedule, c.lr_end = 10_000, "linear", 0.0
    c.grad_clip_norm = 1.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 2000
    return c


def _walk(c: ml_collections.ConfigDict, prefix: str = ""):
    for k, v in c.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            yield from _walk(v, key + ".")
        else:
            yield key, v


def _type_ok(want: Any, got: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool)
    if isinstance(want, float):
        return isinstance(got, (int, float))
    return isinstance(got, type(want))


def unknown_key_message(key: str, value: Any) -> str | None:
    """None if `key` (dotted) is in the schema, else the message naming it and the closest key."""
    schema = dict(_walk(defaults()))
    if key in schema:
        return None
    close = difflib.get_close_matches(key, schema, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown config key '{key}' (value {value!r}).{hint} "
        f"The keys that exist are listed in mixer_jax/config.py:defaults()."
    )


def check_schema(config: ml_collections.ConfigDict) -> None:
    """Unknown keys and wrong types, against `defaults()`."""
    schema = dict(_walk(defaults()))
    for key, value in _walk(config):
        if message := unknown_key_message(key, value):
            raise ConfigError(message)
        want = schema[key]
        if not _type_ok(want, value):
            raise ConfigError(
                f"config key '{key}' has value {value!r} of type "
                f"{type(value).__name__}, but it must be a {type(want).__name__} "
                f"(default {want!r})."
            )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the one allowed -1 axis so the product equals the device count."""
    sizes = {a: int(mesh[a]) for a in MESH_AXES}
    for a, s in sizes.items():
        _require(s == -1 or s >= 1, f"config key 'mesh.{a}' is {s}; use a positive size or -1 (the rest).")
    rest = [a for a, s in sizes.items() if s == -1]
    _require(len(rest) <= 1, f"config 'mesh' has -1 for {rest}; at most one axis may be -1.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        _require(
            num_devices % fixed == 0,
            f"config 'mesh' {sizes}: the fixed axes' product {fixed} does not divide the {num_devices} devices.",
        )
        sizes[rest[0]] = num_devices // fixed
    _require(
        math.prod(sizes.values()) == num_devices,
        f"config 'mesh' {sizes} covers {math.prod(sizes.values())} devices, but there are "
        f"{num_devices}; make the sizes multiply to {num_devices}, or set one axis to -1.",
    )
    return sizes


def validate(
    config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1, resuming: bool = False
) -> None:
    """Every check that can run before compiling or reading data. Raises ConfigError.

    `resuming`: the workdir has a checkpoint, which the run restores instead of reading `init.path`.
    """
    check_schema(config)
    _require(config.total_steps > 0, f"config key 'total_steps' is {config.total_steps}; it must be > 0.")
    _require(0 <= config.seed < 2**32, f"config key 'seed' is {config.seed}; it must lie in [0, 2**32).")
    _require(
        config.lr >= 0 and math.isfinite(config.lr),
        f"config key 'lr' is {config.lr}; the learning rate must be a finite number >= 0.",
    )
    _require(
        config.wd >= 0 and math.isfinite(config.wd),
        f"config key 'wd' is {config.wd}; weight decay must be a finite number >= 0.",
    )
    o = config.optim
    for key in ("b1", "b2", "momentum"):
        _require(0 <= o[key] < 1, f"config key 'optim.{key}' is {o[key]}; it must lie in [0, 1).")
    _require(o.eps > 0, f"config key 'optim.eps' is {o.eps}; it must be > 0.")
    try:
        re.compile(o.wd_regex)
    except re.error as e:
        raise ConfigError(f"config key 'optim.wd_regex' is {o.wd_regex!r}, not a regular expression: {e}.") from None
    _require(
        0 <= config.warmup_steps <= config.total_steps,
        f"config key 'warmup_steps' is {config.warmup_steps}; it must lie in [0, total_steps={config.total_steps}].",
    )
    _require(0 <= config.lr_end <= 1, f"config key 'lr_end' is {config.lr_end}; it is a fraction of lr in [0, 1].")
    _require(
        config.grad_clip_norm >= 0, f"config key 'grad_clip_norm' is {config.grad_clip_norm}; use >= 0 (0 disables)."
    )
    for key, allowed in (
        ("schedule", SCHEDULES),
        ("loss", LOSSES),
        ("optim.name", OPTIMIZERS),
        ("model.dtype", DTYPES),
        ("model.param_dtype", DTYPES),
        ("optim.state_dtype", DTYPES),
        ("model.remat", tuple(models.REMAT_POLICIES)),
        ("model.matmul_dtype", ("", *DTYPES)),
        ("model.matmuls", models.MATMULS),
        ("model.gelu_backward", models.GELU_BACKWARDS),
        ("model.layer_norm_backward", models.LAYER_NORM_BACKWARDS),
        ("mode", MODES),
        ("best_metric", BEST_METRICS),
    ):
        value = functools.reduce(lambda c, k: c[k], key.split("."), config)
        shown = ", ".join(a or "'' (the default)" for a in allowed)  # An empty string is a value too.
        _require(value in allowed, f"config key '{key}' is {value!r}; allowed: {shown}.")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        _require(
            config[key] >= 0 and (key != "log_every" or config[key] > 0),
            f"config key '{key}' is {config[key]}; it must be {'> 0' if key == 'log_every' else '>= 0'}.",
        )
    _require(config.steps_per_call >= 1, f"config key 'steps_per_call' is {config.steps_per_call}; use >= 1.")
    _require(
        config.keep_checkpoints >= 1, f"config key 'keep_checkpoints' is {config.keep_checkpoints}; keep at least 1."
    )
    _require(config.keep_best >= 0, f"config key 'keep_best' is {config.keep_best}; use >= 0 (0 disables).")

    m = config.model
    try:
        fields = models.parse_variant(m.variant)
    except ValueError as e:
        raise ConfigError(f"config key 'model.variant': {e}.") from None
    _require(m.num_classes > 0, f"config key 'model.num_classes' is {m.num_classes}; it must be > 0.")
    _require(
        m.image_size > 0 and m.image_size % fields["patch_size"] == 0,
        f"config key 'model.image_size' is {m.image_size}, which is not divisible by patch "
        f"{fields['patch_size']} of variant {m.variant}; use a multiple of {fields['patch_size']}.",
    )
    _require(0 <= m.dropout_rate < 1, f"config key 'model.dropout_rate' is {m.dropout_rate}; it must lie in [0, 1).")
    _require(0 <= m.stoch_depth < 1, f"config key 'model.stoch_depth' is {m.stoch_depth}; it must lie in [0, 1).")
    _require(
        m.matmuls != "fused" or m.gelu_approximate,
        "config key 'model.matmuls' is 'fused', which computes the tanh GELU, but model.gelu_approximate is "
        "False: set model.gelu_approximate=True or model.matmuls='auto'.",
    )

    sizes = mesh_shape(config.mesh, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    _require(config.accum_steps >= 1, f"config key 'accum_steps' is {config.accum_steps}; use >= 1.")
    unit = math.lcm(batch_shards, num_processes) * config.accum_steps
    _require(
        config.batch_size > 0 and config.batch_size % unit == 0,
        f"config key 'batch_size' is {config.batch_size}, which is not divisible by the {batch_shards} batch shards "
        f"(mesh data x fsdp = {sizes['data']} x {sizes['fsdp']}), {num_processes} process(es) and "
        f"accum_steps={config.accum_steps} microbatches; use a multiple of {unit}.",
    )

    try:
        weights.finetune_overrides(m.variant, m.image_size, m.pretrain_image_size)
    except ValueError as e:
        raise ConfigError(f"config key 'model.pretrain_image_size': {e}.") from None
    _require(
        m.pretrain_image_size == 0 or config.init.path,
        f"config key 'model.pretrain_image_size' is {m.pretrain_image_size}, but config key 'init.path' is empty; "
        f"it names the weights pretrained at that size.",
    )
    _require(
        not config.init.path or resuming or os.path.exists(config.init.path),
        f"config key 'init.path' is {config.init.path!r}, which does not exist; give an .npz, .safetensors or "
        f".pth file, or a workdir or checkpoint directory.",
    )
    f = config.fewshot
    if f.datasets:
        _require(f.every >= 0, f"config key 'fewshot.every' is {f.every}; use >= 0 (0: only at the end).")
        shots = [s.strip() for s in f.shots.split(",") if s.strip()]
        _require(
            bool(shots) and all(s.isdigit() and int(s) > 0 for s in shots),
            f"config key 'fewshot.shots' is {f.shots!r}; give positive counts, e.g. '1,5,10,25'.",
        )
        _require(f.num_seeds >= 1, f"config key 'fewshot.num_seeds' is {f.num_seeds}; use >= 1.")
        _require(f.l2_reg > 0, f"config key 'fewshot.l2_reg' is {f.l2_reg}; use > 0.")

    _require(config.input.num_workers >= 0, f"config key 'input.num_workers' is {config.input.num_workers}; use >= 0.")
    _require(config.input.prefetch >= 0, f"config key 'input.prefetch' is {config.input.prefetch}; use >= 0.")
