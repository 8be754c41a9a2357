"""Fault tolerance: bit-exact resume, SIGKILL chaos, SIGTERM, cross-mesh restore, bad checkpoints."""

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, digits_config
from test_distributed import small_config

from mixer_jax import checkpointing, optim, sharding, train

BASE = {  # Mixer-Mu/4 on digits, a checkpoint every 4 steps and every loss logged.
    "model.variant": "Mu/4",
    "batch_size": 32,
    "warmup_steps": 2,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 4,
    "keep_checkpoints": 2,
}


def launch(data_dir, workdir, **kw):
    args = ["--config=configs/digits.py", f"--workdir={workdir}", f"--config.input.data_dir={data_dir}"]
    args += [f"--config.{k}={v}" for k, v in (BASE | kw).items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [sys.executable, "-m", "mixer_jax.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(data_dir, workdir, **kw):
    p = launch(data_dir, workdir, **kw)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def step_losses(workdir):
    """step -> loss; a step trained twice (after a resume) must have logged the same loss."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "train/loss" in row:
                assert out.setdefault(row["step"], row["train/loss"]) == row["train/loss"], row
    return out


def last_logged_step(workdir):
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return max(json.loads(line)["step"] for line in f if line.strip())
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return 0


def final_params(workdir):
    return checkpointing.load_state_numpy(os.path.join(workdir, "checkpoints"))[1]["params"]


def assert_bit_identical(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """40 steps without interruption: the reference for every resumed run."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    rc, err = run(data_dir, workdir, total_steps=40)
    assert rc == 0, err[-3000:]
    return workdir


def test_sigterm_saves_exits_3_and_resumes_bit_exactly(straight, data_dir, tmp_path):
    workdir = str(tmp_path)
    p = launch(data_dir, workdir, total_steps=40)
    while last_logged_step(workdir) < 15:
        assert p.poll() is None, p.stderr.read()[-3000:]
        time.sleep(0.01)
    signalled_at = last_logged_step(workdir)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err[-3000:]
    saved = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).latest_step()
    assert f"preempted: saved step {saved}" in err
    assert signalled_at <= saved <= signalled_at + 2  # The step it was in, plus one (and the log's lag).

    rc, err = run(data_dir, workdir, total_steps=40)
    assert rc == 0 and f"restored step {saved} from" in err, err[-3000:]
    assert step_losses(workdir) == step_losses(straight)  # Every step's loss, bit for bit.
    assert_bit_identical(final_params(workdir), final_params(straight))


def test_steps_per_call_resumes_off_its_grid_bit_exactly(straight, data_dir, tmp_path):
    """The straight run (one step per call) resumed from step 36 with 8 steps per call: one call of
    the 4 steps left, the straight run's parameters bit for bit and its last 4 losses' mean."""
    workdir = str(tmp_path)
    shutil.copytree(os.path.join(straight, "checkpoints"), os.path.join(workdir, "checkpoints"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "40"))
    rc, err = run(data_dir, workdir, total_steps=40, steps_per_call=8, log_every=8, checkpoint_every=8)
    assert rc == 0 and "restored step 36 from" in err, err[-3000:]
    assert_bit_identical(final_params(workdir), final_params(straight))
    per_step = step_losses(straight)
    assert step_losses(workdir) == {40: pytest.approx(np.mean(np.float32([per_step[s] for s in range(37, 41)])))}


def test_sigkill_chaos(straight, data_dir, tmp_path):
    """SIGKILL at 3 random moments, 2 of them while an async save is in flight; relaunch each time."""
    workdir = str(tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    rng = random.Random(0)
    kinds = ["during_save", "random", "during_save"]
    for kind in kinds:
        before = checkpointing.Checkpointer(ckpt_dir, keep=2).latest_step() if os.path.isdir(ckpt_dir) else None
        start_step = last_logged_step(workdir)
        p = launch(data_dir, workdir, total_steps=40)
        deadline = time.time() + 120
        target = start_step + rng.randint(1, 5)
        while p.poll() is None and time.time() < deadline:
            saving = os.path.isdir(ckpt_dir) and any("tmp" in d for d in os.listdir(ckpt_dir))
            if (kind == "during_save" and saving) or (kind == "random" and last_logged_step(workdir) >= target):
                break
            time.sleep(0.002)
        assert p.poll() is None, f"the run ended before its {kind} kill: {p.stderr.read()[-2000:]}"
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        if before is not None:  # The relaunch resumed from the latest complete checkpoint.
            assert last_logged_step(workdir) >= before
    rc, err = run(data_dir, workdir, total_steps=40)
    assert rc == 0, err[-3000:]
    steps = checkpointing.Checkpointer(ckpt_dir, keep=2).all_steps()
    assert max(steps) == 40
    assert step_losses(workdir) == step_losses(straight)
    assert_bit_identical(final_params(workdir), final_params(straight))


def test_restore_onto_other_meshes(data_dir, tmp_path):
    """Written 8-way FSDP; restored onto 2x2x2 here and onto one device in a fresh process."""
    c = small_config(data_dir, total_steps=3, **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1})
    train.train_and_evaluate(c, str(tmp_path))
    saved = final_params(tmp_path)

    c.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(c.mesh)
    tx, _ = optim.make(c)
    init_state, shardings = train.sharded_init(train.create_model(c), tx, mesh)
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(init_state, jax.random.key(0)), shardings)
    state, data_state = checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=3).restore(3, abstract)
    assert data_state == {"next_index": 3}
    kernel = state.params["MixerBlock_0"]["channel_mixing"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert_bit_identical(jax.device_get(state.params), saved)

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [
        f"--workdir={tmp_path}",
        "--config=configs/digits.py",
        f"--config.input.data_dir={data_dir}",
        "--config.mode=eval",
        "--config.model.variant=Mu/4",
        "--config.mesh.fsdp=1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "mixer_jax.main", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored step 3 from" in result.stderr and "1 devices" in result.stderr


def tree_hashes(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def base_config(data_dir, **kw):
    """`run`'s config, for the trainer in this process (8 devices)."""
    return digits_config(BASE | {"input.data_dir": data_dir} | kw)


@pytest.fixture(scope="module")
def good_workdir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("good"))
    train.train_and_evaluate(base_config(data_dir, total_steps=8), workdir)  # Checkpoints at steps 4 and 8.
    return workdir


def _truncate(workdir):
    # Every array-data file the process wrote (`ocdbt.process_0/d/`), cut in half. Which of them the
    # restore reads depends on the writer's timing: once the save merges the process's B-tree into
    # the checkpoint's own (`d/`), the files that held only the process's tree nodes are no longer
    # read, and one of those can be the largest.
    state = os.path.join(workdir, "checkpoints", "8", "state")
    data = [
        os.path.join(r, f)
        for r, _, fs in os.walk(state)
        if r.endswith(os.path.join("ocdbt.process_0", "d"))
        for f in fs
    ]
    assert data
    for victim in data:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)


def _garbage_metadata(workdir):
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "8")):
        for f in files:
            if "METADATA" in f.upper() or f == "_sharding" or f.endswith(".json"):
                with open(os.path.join(root, f), "w") as fh:
                    fh.write("\x00garbage{{")


BAD = {
    "truncated file": (_truncate, {}, "checkpoint step 8"),
    "deleted directory": (lambda w: shutil.rmtree(os.path.join(w, "checkpoints", "8", "state")), {}, "step 8"),
    "wrong variant": (lambda w: None, {"model.variant": "Ti/4"}, "model.variant: 'Mu/4' -> 'Ti/4'"),
    "wrong variant, changes allowed": (
        lambda w: None,
        {"model.variant": "Ti/4", "allow_config_change": True},
        "params/MixerBlock_0/LayerNorm_0/bias (32,) in the checkpoint vs (128,) in the model",
    ),
    "wrong number of classes": (
        lambda w: None,
        {
            "model.num_classes": 7,
            "input.pp_train": "resize(16)|rgb|value_range(-1,1)|onehot(7)",
            "input.pp_eval": "resize(16)|rgb|value_range(-1,1)|onehot(7)",
            "allow_config_change": True,
        },
        "params/head/bias (10,) in the checkpoint vs (7,) in the model",
    ),
    "another optimizer, changes allowed": (
        lambda w: None,
        {"optim.name": "sgd", "allow_config_change": True},
        "only in the checkpoint: opt_state/1/0/count, opt_state/1/0/mu/",
    ),
    "garbage in the metadata": (_garbage_metadata, {}, "step 8"),
    "past total_steps": (lambda w: None, {"total_steps": 6}, "checkpoint step 8 in"),
}


# Through the command line: exit status 2 and one message, even when Orbax fails inside (the
# message's wording is the trainer's, which the in-process cases below check for the rest).
CLI_CASES = ["truncated file", "garbage in the metadata"]


def corrupted(case, good_workdir, tmp_path):
    """A copy of the good workdir, corrupted by `case`, and the hashes to compare after the run."""
    workdir = str(tmp_path / "w")
    shutil.copytree(good_workdir, workdir)
    BAD[case][0](workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    return workdir, tree_hashes(os.path.join(checkpoints, "4")), tree_hashes(checkpoints)


def assert_untouched(workdir, step4, after_corruption):
    checkpoints = os.path.join(workdir, "checkpoints")
    assert tree_hashes(os.path.join(checkpoints, "4")) == step4  # The good checkpoint is untouched...
    assert tree_hashes(checkpoints) == after_corruption  # ...and nothing else changed.


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_checkpoint_exits_2(case, good_workdir, data_dir, tmp_path):
    _, overrides, fragment = BAD[case]
    workdir, step4, after_corruption = corrupted(case, good_workdir, tmp_path)
    rc, err = run(data_dir, workdir, **({"total_steps": 12} | overrides))
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("mixer_jax: error:")]
    assert len(message) == 1 and fragment in message[0], err[-3000:]
    assert_untouched(workdir, step4, after_corruption)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_refused(case, good_workdir, data_dir, tmp_path):
    _, overrides, fragment = BAD[case]
    workdir, step4, after_corruption = corrupted(case, good_workdir, tmp_path)
    with pytest.raises(checkpointing.CheckpointError) as refused:
        train.train_and_evaluate(base_config(data_dir, **({"total_steps": 12} | overrides)), workdir)
    assert fragment in str(refused.value)
    assert_untouched(workdir, step4, after_corruption)


def test_eval_leaves_a_live_run_alone(good_workdir, data_dir, tmp_path):
    """mode=eval on another run's workdir (named like a step: 7) evaluates its latest step and leaves
    its checkpoints as they are, the save it has in flight included."""
    live = tmp_path / "7"
    shutil.copytree(good_workdir, live)
    in_flight = live / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000"
    in_flight.mkdir()
    (in_flight / "part").write_text("written so far")
    before = tree_hashes(live / "checkpoints")
    evaluation = tmp_path / "eval"
    config = base_config(data_dir, mode="eval", eval_checkpoint=str(live))
    metrics = train.train_and_evaluate(config, str(evaluation))
    assert metrics["eval/examples"] == 360 and tree_hashes(live / "checkpoints") == before
    with open(evaluation / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [8]
    assert not (evaluation / "checkpoints").exists()
    config.eval_checkpoint = str(tmp_path / "nope")
    with pytest.raises(checkpointing.CheckpointError, match="config key 'eval_checkpoint': .*/nope does not exist"):
        train.train_and_evaluate(config, str(evaluation))


def test_an_error_mid_run_closes_what_the_run_opened(data_dir, tmp_path, monkeypatch):
    """An unforeseen error (here: the metrics log fails at step 5, with step 4's save in flight)
    still finishes that save, closes every checkpointer and puts back the SIGTERM handler."""
    sigterm = signal.getsignal(signal.SIGTERM)
    opened, closed = [], []
    init, close, append = checkpointing.Checkpointer.__init__, checkpointing.Checkpointer.close, train._append_jsonl

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    def tracked_close(self):
        closed.append(self)
        close(self)

    def failing_append(workdir, step, metrics, is_main):
        if step == 5:
            raise OSError("disk full")
        append(workdir, step, metrics, is_main)

    monkeypatch.setattr(checkpointing.Checkpointer, "__init__", tracked_init)
    monkeypatch.setattr(checkpointing.Checkpointer, "close", tracked_close)
    monkeypatch.setattr(train, "_append_jsonl", failing_append)
    with pytest.raises(OSError, match="disk full"):
        train.train_and_evaluate(base_config(data_dir, total_steps=8), str(tmp_path))
    assert opened and {id(c) for c in opened} <= {id(c) for c in closed}
    assert signal.getsignal(signal.SIGTERM) is sigterm
    assert checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2).all_steps() == [4]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path)
    rc, err = run(data_dir, workdir, total_steps=30, lr=1e12, grad_clip_norm=0.0, checkpoint_every=1, warmup_steps=0)
    assert rc == 4, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("mixer_jax: error: non-finite")][0]
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2).all_steps()
    assert steps and max(steps) == bad_step - 1 and f"step {bad_step - 1} in" in line
    params = final_params(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_keep_best_and_latest(data_dir, tmp_path):
    workdir = str(tmp_path)
    config = base_config(data_dir, total_steps=24, eval_every=4, keep_checkpoints=1, keep_best=1, lr=0.01)
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        acc = {r["step"]: r["eval/accuracy"] for r in map(json.loads, f) if "eval/accuracy" in r}
    best = max(sorted(acc), key=lambda s: acc[s])  # The earliest step of the best accuracy.
    kept = set(checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1).all_steps())
    assert 24 in kept and best in kept and len(kept) == len({24, best}), (kept, acc)


def test_keep_best_survives_a_resume(tmp_path):
    """The best checkpoint of an earlier run of the workdir outlives the resumed run's saves: the
    metrics it was kept by are read back from disk."""
    state, config = {"w": np.ones(3, np.float32)}, digits_config({})

    def session(saves):
        ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, keep_best=1)
        for step, accuracy in saves:
            metrics = None if accuracy is None else {"eval/accuracy": accuracy, "eval/loss": 1 - accuracy}
            ckpt.save(step, state, {"next_index": step}, config, metrics=metrics)
        ckpt.wait()
        ckpt.close()
        return ckpt.all_steps()

    assert session([(1, 0.9), (2, 0.1), (3, None)]) == [1, 3]
    assert session([(4, 0.3), (5, None)]) == [1, 5]


def rows_with(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@contextlib.contextmanager
def sigterm_when_logged(monkeypatch, when):
    """SIGTERM to this process right after the trainer logs a row for which `when(step, row)`."""
    append = train._append_jsonl

    def append_then_signal(workdir, step, metrics, is_main):
        append(workdir, step, metrics, is_main)
        if when(step, metrics):
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(train, "_append_jsonl", append_then_signal)
        yield


@pytest.mark.parametrize(
    "notice_after, saved",
    [(3, 4), (4, 4), (8, 8)],
    ids=["in_the_call_before_the_evaluation", "during_the_evaluation", "during_the_final_evaluation"],
)
def test_preemption_at_an_evaluation_step_saves_first(
    notice_after, saved, good_workdir, data_dir, tmp_path, monkeypatch
):
    """A SIGTERM after step `notice_after` is logged, in the call that ends on an evaluation step or
    during that step's evaluation, saves at once and leaves the evaluation to the resumed run, which
    runs it before anything else: the evaluations match an uninterrupted run's."""
    (straight,) = rows_with(good_workdir, "eval/accuracy")  # Step 8, the end.
    workdir = str(tmp_path)
    config = base_config(data_dir, total_steps=8, eval_every=4)
    notice = sigterm_when_logged(monkeypatch, lambda step, row: step == notice_after and "train/loss" in row)
    with notice, pytest.raises(train.Preempted, match=f"saved step {saved} .* evaluates step {saved} first"):
        train.train_and_evaluate(config, workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
    assert ckpt.latest_step() == saved and ckpt.deferred(saved) == ("eval",)
    ckpt.close()
    assert all(r["step"] < saved for r in rows_with(workdir, "eval/accuracy"))

    final = train.train_and_evaluate(config, workdir)
    evals = rows_with(workdir, "eval/accuracy")
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1] == straight and final == {k: v for k, v in straight.items() if k != "step"}
    train.train_and_evaluate(config, workdir)  # A re-run of the finished workdir reports, adds no rows.
    assert [r["step"] for r in rows_with(workdir, "eval/accuracy")] == [4, 8]


def test_preemption_during_the_few_shot_probes_keeps_the_evaluation(data_dir, tmp_path, monkeypatch):
    """A SIGTERM as step 4's evaluation is logged stops its few-shot probes: the checkpoint keeps
    the evaluation's metrics (for keep_best) and leaves only the probes to the resumed run."""
    workdir = str(tmp_path)
    probes = {"fewshot.datasets": "digits", "fewshot.shots": "2", "fewshot.num_seeds": 1, "fewshot.every": 4}
    config = base_config(data_dir, total_steps=8, eval_every=4, keep_best=1, **probes)
    notice = sigterm_when_logged(monkeypatch, lambda step, row: step == 4 and "eval/accuracy" in row)
    with notice, pytest.raises(train.Preempted, match="saved step 4 .* evaluates step 4 first"):
        train.train_and_evaluate(config, workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, keep_best=1)
    assert ckpt.deferred(4) == ("fewshot",) and ckpt.manager.metrics(4)["eval/examples"] == 360
    ckpt.close()

    train.train_and_evaluate(config, workdir)
    assert [r["step"] for r in rows_with(workdir, "eval/accuracy")] == [4, 8]
    assert [r["step"] for r in rows_with(workdir, "fewshot/digits_2shot")] == [4, 8]
