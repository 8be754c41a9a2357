"""Sharding layouts, gradient accumulation and multiple processes give the numbers of one device."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, digits_config
from jax.sharding import PartitionSpec as P
from test_config import run_main

from mixer_jax import checkpointing, optim, sharding, train
from mixer_jax.config import defaults

PP = "pad_crop(1)|resize(16)|rgb|value_range(-1,1)|onehot(10)"
# Mixer-Mu/4 on digits: every width divides 8. SGD with momentum: its update is linear in the
# gradient, so parameters can be compared at rtol 1e-5. (Adam's m/sqrt(v) turns reduction-order noise in
# near-zero gradients into update differences of up to ~0.5% of lr; the losses still agree.)
OVERRIDES = {
    "model.variant": "Mu/4",
    "model.image_size": 16,
    "model.num_classes": 10,
    "input.pp_train": PP,
    "input.pp_eval": "resize(16)|rgb|value_range(-1,1)|onehot(10)",
    "batch_size": 32,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_every": 0,
    "checkpoint_every": 0,
    "lr": 0.1,
    "optim.name": "sgd",
}


def small_config(data_dir, **kw):
    return digits_config(OVERRIDES | {"input.data_dir": data_dir} | kw)  # cli_args's twin, in process.


def cli_args(data_dir, workdir, **kw):
    values = OVERRIDES | {"input.data_dir": data_dir} | kw
    return ["--config=configs/digits.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def eval_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "eval/accuracy" in r]


def params(workdir):
    return checkpointing.load_state_numpy(os.path.join(workdir, "checkpoints"))[1]["params"]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def one_device_run(data_dir, tmp_path_factory):
    """3 steps on a single device, in a process of its own."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    result = run_main(*cli_args(data_dir, workdir, total_steps=3), devices=1, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_layouts_match_one_device(mesh, one_device_run, data_dir, tmp_path):
    data, fsdp, tensor = mesh
    c = small_config(data_dir, total_steps=3, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    train.train_and_evaluate(c, str(tmp_path))
    np.testing.assert_allclose(losses(tmp_path), losses(one_device_run), rtol=1e-5)
    assert len(losses(tmp_path)) == 3
    assert_trees_close(params(tmp_path), params(one_device_run))


@pytest.mark.parametrize(
    "mesh,channel_in,token_in,head",
    [
        ((8, 1, 1), (32, 128), (16, 16), (32, 10)),  # Data parallel: whole on every device.
        ((1, 8, 1), (4, 128), (16, 2), (4, 10)),  # FSDP: the embed axis (token MLP: hidden) split 8 ways.
        ((1, 1, 8), (32, 16), (16, 2), (32, 10)),  # Tensor parallel: the MLP hidden dims split.
        ((2, 2, 2), (16, 64), (16, 4), (16, 10)),
    ],
)
def test_declared_shardings(mesh, channel_in, token_in, head, data_dir):
    c = small_config(data_dir, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    m = sharding.make_mesh(c.mesh)
    tx, _ = optim.make(c)
    init_state, shardings = train.sharded_init(train.create_model(c), tx, m)
    state = init_state(jax.random.key(0))
    block = state.params["MixerBlock_0"]
    mu = state.opt_state[1][1][0].trace["MixerBlock_0"]  # clip -> (identity, sgd: (momentum, lr)).
    for tree in (block, mu):
        assert tree["channel_mixing"]["Dense_0"]["kernel"].addressable_shards[0].data.shape == channel_in
        assert tree["token_mixing"]["Dense_0"]["kernel"].addressable_shards[0].data.shape == token_in
    assert state.params["head"]["kernel"].addressable_shards[0].data.shape == head
    if mesh == (1, 8, 1):
        assert shardings.params["MixerBlock_0"]["channel_mixing"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
        # Every weight of more than one dimension is split: nothing is whole on one device.
        for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state[1][1][0].trace):
            if x.ndim > 1:
                assert x.addressable_shards[0].data.size == x.size // 8


def collective_sizes(hlo: str) -> list[int]:
    """Element counts of every array that a collective of compiled HLO text produces."""
    ops = r"(?:all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) " + ops, line)
        if m:
            shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            sizes += [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes]
    return sizes


def abstract_train_step(c):
    """(the jitted train step of config `c`, its abstract sharded state, an abstract one-step batch)."""
    m = sharding.make_mesh(c.mesh)
    model = train.create_model(c)
    tx, schedule = optim.make(c)
    init_state, shardings = train.sharded_init(model, tx, m)
    state = checkpointing.abstract_with_shardings(jax.eval_shape(init_state, jax.random.key(0)), shardings)
    stacked = sharding.stacked_batch_sharding(m)
    batch = {
        "image": jax.ShapeDtypeStruct((1, c.batch_size, 16, 16, 3), np.uint8, sharding=stacked),
        "labels": jax.ShapeDtypeStruct((1, c.batch_size, 10), np.float32, sharding=stacked),
    }
    return train.make_train_step(c, model, tx, schedule, m, shardings), state, batch


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 4, 1)])
def test_batch_parallel_steps_move_only_weights(mesh, data_dir, monkeypatch):
    """Data parallel and FSDP: the step that GPUs and TPUs compile moves weights and gradients
    only, never activations. (Merging the tokens and the sharded batch into matmul rows made XLA
    gather whole activations: 2 all-gathers per block in data parallel, activation-sized all-reduces
    in FSDP.) The model is built as for a GPU; XLA's partitioner is the same on every backend."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    c = small_config(data_dir, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    step, state, batch = abstract_train_step(c)
    hlo = step.lower(state, batch).compile().as_text()
    largest_weight = max(x.size for x in jax.tree.leaves(state.params))  # 32 x 128; activations: 16 x 32 x 32 and up.
    sizes = collective_sizes(hlo)
    assert sizes and max(sizes) <= largest_weight, sorted(sizes)[-5:]


def test_mesh_takes_the_devices_in_order(monkeypatch):
    """Whatever order the platform lists them in: by process, then by id (one process here)."""
    devices = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda: devices[::-1])
    c = defaults()
    c.mesh.update(data=2, fsdp=2, tensor=2)
    assert [d.id for d in sharding.make_mesh(c.mesh).devices.flat] == sorted(d.id for d in devices)


def test_fit_spec_keeps_indivisible_dims_whole():
    c = defaults()
    c.mesh.update(data=1, fsdp=8, tensor=1)
    m = sharding.make_mesh(c.mesh)
    assert sharding.fit_spec(P("fsdp", ("tensor", "fsdp")), (196, 384), m) == P(None, ("tensor", "fsdp"))


def test_gradient_accumulation_matches_large_batch(data_dir, tmp_path):
    c = small_config(data_dir, total_steps=1, batch_size=64, **{"mesh.data": 8})
    train.train_and_evaluate(c, str(tmp_path / "large"))
    c.accum_steps = 4  # 4 microbatches of 16.
    train.train_and_evaluate(c, str(tmp_path / "accum"))
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "large"), rtol=1e-5)
    assert_trees_close(params(tmp_path / "accum"), params(tmp_path / "large"))


def test_gradient_accumulation_sums_in_float32(data_dir):
    """bfloat16 parameters: the microbatch gradients are summed in float32 (the scan's carry), and the
    update sees their mean in the parameters' dtype."""
    c = small_config(data_dir, batch_size=64, accum_steps=4, **{"mesh.data": 8, "model.param_dtype": "bfloat16"})
    step, state, batch = abstract_train_step(c)
    jaxpr = step.trace(state, batch).jaxpr

    def scan_carries(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                start = eqn.params["num_consts"]
                yield eqn.params["jaxpr"].in_avals[start : start + eqn.params["num_carry"]]
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                        yield from scan_carries(getattr(sub, "jaxpr", sub))

    (carry,) = list(scan_carries(jaxpr.jaxpr))
    assert len(carry) == len(jax.tree.leaves(state.params)) + 1  # The gradients and the loss.
    assert {a.dtype for a in carry} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}


def rows_of(processes, rows_per_device):
    """(process, first row, end row) for devices laid out process by process along the batch."""
    return {(p, i * rows_per_device, (i + 1) * rows_per_device) for i, p in enumerate(processes)}


@pytest.mark.parametrize(
    "device_rows, want",
    [
        # 2 processes x 4 devices, the batch split 8 ways: halves.
        (rows_of([0, 0, 0, 0, 1, 1, 1, 1], 4), [(0, 2), (1, 2)]),
        # mesh (1, 1, 8): tensor parallel across both processes, every device holds the whole batch.
        ({(p, 0, 32) for p in (0, 1)}, [(0, 1), (0, 1)]),
        # 4 processes x 2 devices, mesh (2, 1, 4): processes 0-1 and 2-3 share a half.
        ({(0, 0, 16), (1, 0, 16), (2, 16, 32), (3, 16, 32)}, [(0, 2), (0, 2), (1, 2), (1, 2)]),
    ],
)
def test_batch_slice_of_each_process(device_rows, want):
    assert [sharding.slice_of_process(device_rows, 32, p) for p in range(len(want))] == want


def test_batch_slice_refuses_interleaved_processes():
    with pytest.raises(ValueError, match="process 0 holds rows .* not one contiguous slice"):
        sharding.slice_of_process(rows_of([0, 1, 0, 1], 8), 32, 0)
    assert sharding.batch_slice(sharding.make_mesh(small_config("").mesh), 32) == (0, 1)


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(port)))
            return True
        except OSError:
            return False


def read(path):
    return path.read_text() if path.is_file() else ""


def processes():
    """(pid, command line) of every process this test can see."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except (ValueError, OSError):
            continue
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight_device_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eight_devices"))
    train.train_and_evaluate(small_config(data_dir, total_steps=20, schedule="constant"), workdir)
    return workdir


def test_two_processes_match_one(eight_device_run, data_dir, tmp_path):
    """launch/local.sh: 2 processes x 4 CPU devices, 4 steps per call, the loss trajectory of 1
    process x 8 devices. A preemption notice to process 1 alone stops both at one step, saved before
    its evaluation; the relaunch evaluates that step, then trains on."""
    workdir = str(tmp_path / "run")
    args = cli_args(data_dir, workdir, total_steps=20, schedule="constant", steps_per_call=4, log_every=4, eval_every=4)
    logs = tmp_path / "run" / "logs"

    def launch():
        command = ["bash", "launch/local.sh", "--num_processes=2", "--devices_per_process=4", f"--port={free_port()}"]
        return subprocess.Popen([*command, "--", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    first = launch()
    deadline = time.monotonic() + 300
    # Both processes have joined the runtime (its SIGTERM handler is set) once process 0 trains.
    while "training from step 0" not in read(logs / "process_0.log"):
        if first.poll() is not None or time.monotonic() > deadline:
            first.terminate()  # local.sh stops its processes.
            pytest.fail(f"no training from process 0: {first.communicate(timeout=60)[1][-3000:]}")
        time.sleep(0.05)
    (process_1,) = [pid for pid, command in processes() if workdir in command and "--process_id=1" in command]
    os.kill(process_1, signal.SIGTERM)
    assert first.wait(timeout=300) == 3, first.stderr.read()[-3000:]
    saved = [int(read(logs / f"process_{i}.log").split("preempted: saved step ")[1].split()[0]) for i in range(2)]
    assert saved[0] == saved[1] < 20
    assert max(eval_steps(workdir), default=0) < saved[0]  # Saved before it was evaluated.
    relaunch = launch()
    assert relaunch.wait(timeout=300) == 0, relaunch.stderr.read()[-3000:]
    assert f"restored step {saved[0]} from" in read(logs / "process_0.log")
    assert eval_steps(workdir) == list(range(4, 21, 4))  # Each step evaluated once, the saved one first.
    np.testing.assert_allclose(losses(workdir), losses(eight_device_run).reshape(5, 4).mean(1), rtol=1e-5)
    # The checkpoint both processes wrote restores in this single process, onto another mesh.
    c = small_config(data_dir, total_steps=20, schedule="constant", **{"mesh.data": 2, "mesh.tensor": 4})
    m = sharding.make_mesh(c.mesh)
    tx, _ = optim.make(c)
    init_state, shardings = train.sharded_init(train.create_model(c), tx, m)
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(init_state, jax.random.key(0)), shardings)
    state, data_state = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).restore(20, abstract)
    assert int(state.step) == 20 and data_state == {"next_index": 20}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params(workdir))
    assert_trees_close(jax.device_get(state.params), params(eight_device_run))


TENSOR_8 = {"mesh.data": 1, "mesh.tensor": 8}


def test_slurm_environment_on_loopback(eight_device_run, data_dir, tmp_path):
    """Two processes that know only SLURM's variables find each other through jax's auto-detection.
    The mesh is (1, 1, 8): tensor parallel across both, so both hold the whole batch and must read
    the same examples (each read its own half before: other losses, and half the eval examples)."""
    workdir = str(tmp_path / "run")
    job_id = next(j for j in np.random.default_rng().permutation(2**12) if port_is_free(j + 65535 - 2**12 + 1))
    procs = []
    for i in range(2):
        env = {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(i),
            "SLURM_LOCALID": str(i),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_NUM_NODES": "1",
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        }
        procs.append(
            subprocess.Popen(
                [
                    "python",
                    "-m",
                    "mixer_jax.main",
                    *cli_args(data_dir, workdir, total_steps=5, schedule="constant", **TENSOR_8),
                ],
                cwd=REPO,
                env=dict(os.environ, **env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 process(es)" in outputs[0]
    np.testing.assert_allclose(losses(workdir), losses(eight_device_run)[:5], rtol=1e-5)


def test_bfloat16_compute_trains(eight_device_run, data_dir, tmp_path):
    """bfloat16 activations, float32 master weights and loss: the first steps track float32."""
    c = small_config(data_dir, total_steps=5, schedule="constant", **{"model.dtype": "bfloat16"})
    c.optim.state_dtype = "bfloat16"
    train.train_and_evaluate(c, str(tmp_path))
    np.testing.assert_allclose(losses(tmp_path), losses(eight_device_run)[:5], rtol=2e-2)
    state = checkpointing.load_state_numpy(os.path.join(tmp_path, "checkpoints"))[1]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(state["opt_state"][1][1][0]["trace"]))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])
def test_bfloat16_matmuls_train_on_any_layout(mesh, eight_device_run, data_dir, tmp_path):
    """float32 activations with bfloat16 matmuls (on CPU, `matmul.dense_matmul`'s plain layouts),
    sharded by data, FSDP and tensor axes: the first steps track float32."""
    layout = {"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]}
    c = small_config(data_dir, total_steps=5, schedule="constant", **{"model.matmul_dtype": "bfloat16"}, **layout)
    assert train.create_model(c).plain_matmuls == (jax.default_backend() == "cpu")
    train.train_and_evaluate(c, str(tmp_path))
    np.testing.assert_allclose(losses(tmp_path), losses(eight_device_run)[:5], rtol=2e-2)
