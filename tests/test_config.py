"""Config validation: every bad config stops the CLI with exit status 2 and one clear message."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO, load_config

from mixer_jax import config as config_lib
from mixer_jax import optim

DIGITS = "configs/digits.py"


def run_main(*args, devices=1, env=None, timeout=120):
    env = dict(os.environ, **(env or {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-m", "mixer_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD = [
    # (arguments after --config, expected fragments of the message)
    (["--config.lrr=0.1"], ["unknown config key", "lrr", "lr"]),
    (["--config.model.variant=X/16"], ["model.variant", "unknown model variant 'X/16'", "B/16"]),
    (["--config.lr=-0.5"], ["'lr' is -0.5", ">= 0"]),
    (["--config.batch_size=100"], ["'batch_size' is 100", "8 batch shards", "multiple of 8"]),
    (["--config.model.image_size=18"], ["'model.image_size' is 18", "not divisible by patch 4"]),
    (
        ["--config.input.dataset=imagenet2012", "--config.input.data_dir=/nonexistent/tfds"],
        ["dataset 'imagenet2012'", "/nonexistent/tfds", "tfds build imagenet2012", "--file_format=array_record"],
    ),
    (["--config.total_steps=many"], ["--config.total_steps=many", "invalid literal for int()"]),
    (["--config.input.pp_train=resize(16)|sharpen(2)"], ["unknown preprocessing op 'sharpen'", "value_range"]),
    (["--config.input.pp_eval=resize(-3)"], ["resize(-3)", "size must be a positive integer"]),
    (["--config.mesh.tensor=3"], ["mesh", "does not divide the 8 devices"]),
    (["--config.warmup_steps=5000", "--config.total_steps=10"], ["'warmup_steps' is 5000", "total_steps=10"]),
    (["--config.schedule=exponential"], ["'schedule' is 'exponential'", "cosine, linear, constant"]),
    (["--config.model.stoch_depth=1.0"], ["'model.stoch_depth' is 1.0", "[0, 1)"]),
    (["--config.input.eval_split=validation"], ["'input.eval_split' is 'validation'", "['test', 'train']"]),
    (["--config.model.num_classes=7"], ["'input.pp_train' makes 10-class labels", "'model.num_classes' is 7"]),
    (["--config.model.pretrain_image_size=8"], ["'model.pretrain_image_size' is 8", "'init.path' is empty"]),
    (["--config.model.pretrain_image_size=12", "--config.init.path=/"], ["pretrain_image_size 12", "integer"]),
    (["--config.fewshot.datasets=digits", "--config.fewshot.shots=5,0"], ["'fewshot.shots' is '5,0'"]),
    (["--config.input.pp_eval=resize(16)|value_range|onehot(10)|mixup(0.2)"], ["mixup(0.2)", "'input.pp_train'"]),
    (["--config.seed=-1"], ["'seed' is -1", "[0, 2**32)"]),
    (["--config.fewshot.datasets=cifar10"], ["dataset 'cifar10' is not prepared"]),
    (["--config.fewshot.datasets=digits:train:validation"], ["'digits' has no split 'validation'"]),
    (["--config.optim.b2=1.0"], ["'optim.b2' is 1.0", "[0, 1)"]),
    (["--config.optim.wd_regex=["], ["'optim.wd_regex' is '['", "not a regular expression"]),
    (["--num_processes=2", "--process_id=1"], ["--num_processes and --process_id", "need --coordinator_address"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD, ids=[" ".join(b[0])[:40] for b in BAD])
def test_bad_config_cli(overrides, fragments, data_dir, tmp_path):
    if "--config.input.data_dir" not in " ".join(overrides):
        overrides = overrides + [f"--config.input.data_dir={data_dir}"]
    result = run_main(f"--config={DIGITS}", f"--workdir={tmp_path}", *overrides, devices=8)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("mixer_jax: error:")]
    assert len(message) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in message[0], message[0]
    assert not os.listdir(tmp_path)  # Nothing was started.


def test_missing_config_file_and_workdir(tmp_path):
    result = run_main("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config file 'configs/nope.py'" in result.stderr and "does not exist" in result.stderr
    result = run_main(f"--config={DIGITS}")
    assert result.returncode == 2 and "--workdir is required" in result.stderr


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from mixer_jax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.model.num_clases = 10\n"
        "    return c\n"
    )
    result = run_main(f"--config={path}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown config key 'model.num_clases'" in result.stderr
    assert "Did you mean 'model.num_classes'?" in result.stderr


def test_config_file_that_raises(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None):\n    raise ValueError('needs :variant=')\n")
    result = run_main(f"--config={path}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not be loaded" in result.stderr and "needs :variant=" in result.stderr


def test_validate_in_process():
    c = config_lib.defaults()
    config_lib.validate(c, num_devices=8)
    c.lr = 1  # An int where a float is expected is fine...
    config_lib.validate(c, num_devices=8)
    # ConfigDict checks types on assignment; a config file can still replace a whole section.
    c.model = ml_collections.ConfigDict(c.model.to_dict() | {"gelu_approximate": 1})  # Not a bool.
    with pytest.raises(config_lib.ConfigError, match="'model.gelu_approximate' has value 1 of type int"):
        config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_is_decoupled(name):
    """Zero gradients: each step shrinks the masked weights by lr x wd, whatever the momentum."""
    c = config_lib.defaults()
    c.optim.name, c.lr, c.wd, c.warmup_steps, c.schedule, c.grad_clip_norm = name, 0.1, 0.1, 0, "constant", 0.0
    tx, _ = optim.make(c)
    params = {"Dense_0": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
    state = tx.init(params)
    for _ in range(50):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["Dense_0"]["kernel"], 0.99**50, rtol=1e-5)
    np.testing.assert_array_equal(params["Dense_0"]["bias"], 1.0)  # Not matched by optim.wd_regex.
    if name == "sgd":  # The state's layout is that of the coupled decay before it: old runs resume.
        decay = optax.add_decayed_weights(0.1, mask=lambda params: optim.regex_mask(params, c.optim.wd_regex))
        sgd = optax.sgd(optax.constant_schedule(0.1), momentum=0.9, accumulator_dtype=jnp.float32)
        before = optax.chain(decay, sgd)
        assert jax.tree.structure(state) == jax.tree.structure(before.init(params))
        assert len(jax.tree.leaves(state)) == 3  # Two traces and a count.
        c.wd = 0.0
        before = optax.chain(optax.identity(), sgd)
        assert jax.tree.structure(optim.make(c)[0].init(params)) == jax.tree.structure(before.init(params))


def test_a_resume_does_not_need_init_path(tmp_path):
    """The workdir's checkpoint replaces init.path, which may be gone by then."""
    from mixer_jax import main

    c = config_lib.defaults()
    c.init.path = str(tmp_path / "moved.npz")
    with pytest.raises(config_lib.ConfigError, match="'init.path' is .*moved.npz', which does not exist"):
        config_lib.validate(c, num_devices=8)
    config_lib.validate(c, num_devices=8, resuming=True)
    assert not main.has_checkpoint(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1733")  # A save that did not finish.
    assert not main.has_checkpoint(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "8")
    assert main.has_checkpoint(str(tmp_path))


def test_mesh_shape():
    c = config_lib.defaults()
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    assert config_lib.mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    c.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(config_lib.ConfigError, match="at most one axis may be -1"):
        config_lib.mesh_shape(c.mesh, 8)
    c.mesh.update(data=2, fsdp=2, tensor=1)
    with pytest.raises(config_lib.ConfigError, match="covers 4 devices, but there are 8"):
        config_lib.mesh_shape(c.mesh, 8)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")))
def test_shipped_configs_validate(name):
    config_lib.validate(load_config(name.removesuffix(".py")), num_devices=8)
