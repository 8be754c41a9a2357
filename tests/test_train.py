"""End to end: the CLI trains digits, evaluates every test example, writes summaries and checkpoints."""

import glob
import os
import re
import shutil

import jax
import pytest
from conftest import final_accuracy, load_config
from test_config import run_main

from mixer_jax import train
from mixer_jax.config import defaults


def event_tags(workdir):
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    return tags


def test_cli_log_summaries_checkpoints_and_resume(digits_run, data_dir, tmp_path):
    """The README's first command (`digits_run`) logs, evaluates, summarises and checkpoints; the
    same command with a longer `total_steps` resumes from its last checkpoint."""
    log, c = digits_run.log, load_config("digits")
    total = c.total_steps
    assert re.search(rf"step 200/{total}  loss [\d.]+  lr [\d.e+-]+  [\d.]+ steps/s  [\d.]+ img/s  ETA \d+m\d\ds", log)
    assert re.search(rf"step {c.eval_every}  eval accuracy [\d.]+  loss [\d.]+  \(360 examples\)", log)
    assert re.search(r"final test accuracy [\d.]+% on 360 examples", log)
    assert "orbax" not in log.lower()  # Library INFO chatter stays out of the console.
    checkpoints = os.listdir(os.path.join(digits_run.workdir, "checkpoints"))
    assert sorted(checkpoints, key=int) == [str(s) for s in range(c.checkpoint_every, total + 1, c.checkpoint_every)]
    assert {"train/loss", "train/lr", "eval/accuracy", "perf/steps_per_s"} <= event_tags(digits_run.workdir)

    workdir = str(tmp_path / "run")
    shutil.copytree(digits_run.workdir, workdir)
    args = ["--config=configs/digits.py", f"--workdir={workdir}", f"--config.input.data_dir={data_dir}"]
    result = run_main(*args, f"--config.total_steps={total + 10}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"restored step {total} from" in result.stderr
        and f"training from step {total} to {total + 10}" in result.stderr
    )
    assert str(total + 10) in os.listdir(os.path.join(workdir, "checkpoints"))


def test_in_process_on_8_devices(data_dir, tmp_path):
    assert jax.device_count() == 8
    c = defaults()
    c.model.update(variant="Mu/4", image_size=16, num_classes=10)
    c.input.update(
        dataset="digits",
        data_dir=data_dir,
        pp_train="resize(16)|rgb|value_range(-1,1)|onehot(10)",
        pp_eval="resize(16)|rgb|value_range(-1,1)|onehot(10)",
    )
    c.update(batch_size=48, total_steps=6, warmup_steps=2, log_every=3, eval_every=0, checkpoint_every=0)
    metrics = train.train_and_evaluate(c, str(tmp_path))
    assert metrics["eval/examples"] == 360  # 8 batches of 48, the last one padded: each example once.
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/loss"] > 0


@pytest.mark.skipif(os.environ.get("MIXER_JAX_SKIP_QUICKSTART") == "1", reason="quickstart run disabled")
def test_quickstart_reaches_98_percent(digits_run):
    """The README's first command, as shipped: at least 98.0% of the 360 test digits. The run is
    shared with the tests that start from a trained digits model (`digits_run`, conftest)."""
    accuracy = final_accuracy(digits_run.log)
    assert accuracy >= 98.0


def test_steps_per_call_divides_every_period():
    c = defaults()
    c.update(steps_per_call=10, log_every=100, eval_every=0, checkpoint_every=500)
    assert train.steps_per_call(c) == 10
    c.log_every = 15
    assert train.steps_per_call(c) == 5
    c.fewshot.every = 4  # Counts only when few-shot probes run.
    assert train.steps_per_call(c) == 5
    c.fewshot.datasets = "digits"
    assert train.steps_per_call(c) == 1


def test_train_step_rounds_bfloat16_as_written_on_gpu(tmp_path):
    """The GPU train step's XLA options (`train.compiler_options`) reach XLA's debug options through
    `jax.jit` (read back from XLA's dump of the compiled module; an unknown name fails the compile).
    CPU and TPU keep XLA's defaults."""
    options = train.compiler_options("gpu")
    assert options == {"xla_allow_excess_precision": False}
    assert train.compiler_options("cpu") is None and train.compiler_options("tpu") is None
    dump = {"xla_dump_to": str(tmp_path)}
    assert float(jax.jit(lambda x: 2 * x, compiler_options=options | dump)(1.5)) == 3.0
    (debug_options,) = glob.glob(os.path.join(tmp_path, "*.debug_options"))
    with open(debug_options) as f:
        assert "xla_allow_excess_precision: false" in f.read().splitlines()
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: 2 * x, compiler_options={"xla_allow_excess_precisio": False})(1.5)
