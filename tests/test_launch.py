"""The launch scripts: the exact commands of --dry-run, usage and errors; local.sh's process handling
with a stand-in interpreter."""

import os
import shlex
import signal
import subprocess
import time

import pytest
from conftest import REPO

LOCAL = "launch/local.sh"
TPU_VM = "launch/tpu_vm.sh"
SLURM = "launch/slurm.sbatch"
TPU = ["--name=mixer", "--zone=europe-west4-a"]


def _env(**extra):
    """The environment without SLURM's variables (a test run inside a SLURM job sees the defaults)."""
    drop = ("SLURM_", "SRUN_", "JAX_LOCAL_DEVICE_IDS", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["TMPDIR"] = "/tmp"
    return env | extra


def _run(script, *args, env=None):
    return subprocess.run(
        ["bash", script, *args], cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=30
    )


def _lines(script, *args, env=None):
    result = _run(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("script", [LOCAL, TPU_VM, SLURM])
def test_scripts_are_executable_and_print_usage(script):
    assert os.access(os.path.join(REPO, script), os.X_OK)
    result = _run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:") and script in result.stdout


@pytest.mark.parametrize(
    "script, args",
    [
        (LOCAL, ["--bogus=1", "--", "--config=configs/digits.py"]),
        (TPU_VM, ["create", *TPU, "--bogus=1"]),
        (SLURM, ["--config=configs/digits.py", "--bogus=1"]),
    ],
)
def test_unknown_option_exits_2_naming_it(script, args):
    result = _run(script, *args)
    assert result.returncode == 2
    assert "error: unknown option '--bogus=1'" in result.stderr
    assert result.stdout == ""


# local.sh


def test_local_dry_run_prints_each_process_exactly(tmp_path):
    args = ["--num_processes=2", "--devices_per_process=4", "--port=12355", "--python=python", "--dry-run"]
    main = ["--config=configs/digits.py", "--workdir=runs/digits_2proc"]
    common = (
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m mixer_jax.main "
        "--config=configs/digits.py --workdir=runs/digits_2proc --coordinator_address=127.0.0.1:12355 --num_processes=2"
    )
    assert _lines(LOCAL, *args, "--", *main) == [f"{common} --process_id=0", f"{common} --process_id=1"]
    # The defaults are the same (port 12355 in --dry-run).
    assert _lines(LOCAL, "--dry-run", "--", *main) == [f"{common} --process_id=0", f"{common} --process_id=1"]
    # The caller's XLA flags are kept, less their device count.
    env = _env(XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8")
    line = _lines(LOCAL, "--dry-run", "--", *main, env=env)[0]
    assert "XLA_FLAGS=--xla_dump_to=/tmp/dump\\ --xla_force_host_platform_device_count=4 " in line
    # Nothing is created.
    _lines(LOCAL, "--dry-run", "--", "--config=configs/digits.py", f"--workdir={tmp_path}/run")
    assert not os.path.exists(tmp_path / "run")


def test_local_dry_run_quotes_for_the_shell():
    lines = _lines(
        LOCAL,
        "--num_processes=3",
        "--devices_per_process=2",
        "--python=/opt/py 3/python",
        "--dry-run",
        "--",
        "--config=configs/digits.py:x",
        "--workdir=my runs/a'b",
    )
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert shlex.split(line) == [
            "env",
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
            "/opt/py 3/python",
            "-m",
            "mixer_jax.main",
            "--config=configs/digits.py:x",
            "--workdir=my runs/a'b",
            "--coordinator_address=127.0.0.1:12355",
            "--num_processes=3",
            f"--process_id={i}",
        ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_processes=0", "--"], "--num_processes must be a positive integer, not '0'"),
        (["--devices_per_process=x", "--"], "--devices_per_process must be a positive integer"),
        (["--port=70000", "--"], "--port must be a port number"),
        (["--port", "--"], "option '--port' needs a value"),
        (["--config=configs/digits.py"], "unknown option '--config=configs/digits.py' (mixer_jax.main's arguments go"),
    ],
)
def test_local_bad_arguments_exit_2(args, message):
    result = _run(LOCAL, "--dry-run", *args, "--config=configs/digits.py")
    assert result.returncode == 2
    assert message in result.stderr


def test_local_needs_main_args():
    result = _run(LOCAL, "--dry-run", "--")
    assert result.returncode == 2 and "no MAIN_ARGS after --" in result.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the interpreter: reports what it was given; FAIL_ID fails, SLEEP sleeps, PID_DIR gets its PID.
for a; do case $a in --process_id=*) id=${a#*=};; esac; done
[[ -z ${PID_DIR:-} ]] || echo $$ > "$PID_DIR/$id"
echo "process $id of $JAX_PLATFORMS $XLA_FLAGS: $*"
if [[ ${FAIL_ID:-} == "$id" ]]; then sleep 0.2; echo "process $id failed" >&2; exit 3; fi
[[ -z ${SLEEP:-} ]] || exec sleep "$SLEEP"
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return str(path)


def test_local_runs_every_process_and_logs_to_workdir(fake_python, tmp_path):
    workdir = tmp_path / "run"
    result = _run(
        LOCAL,
        f"--python={fake_python}",
        "--num_processes=3",
        "--devices_per_process=2",
        "--port=12399",
        "--",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr
    flags = "--xla_force_host_platform_device_count=2: -m mixer_jax.main --config=configs/digits.py"
    coordinator = "--coordinator_address=127.0.0.1:12399 --num_processes=3"
    expected = [f"process {i} of cpu {flags} --workdir={workdir} {coordinator} --process_id={i}" for i in range(3)]
    assert result.stdout.splitlines() == expected[:1]  # Only process 0 on the console...
    for i in range(3):  # ...and every process in its log.
        assert (workdir / "logs" / f"process_{i}.log").read_text().splitlines() == [expected[i]]


def test_local_failure_stops_the_others_and_names_the_log(fake_python, tmp_path):
    workdir = tmp_path / "run"
    start = time.monotonic()
    result = _run(
        LOCAL,
        f"--python={fake_python}",
        "--num_processes=3",
        "--port=12399",
        "--",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        env=_env(FAIL_ID="1", SLEEP="60"),
    )
    assert time.monotonic() - start < 20
    assert result.returncode == 3
    log = workdir / "logs" / "process_1.log"
    assert f"process 1 failed with exit status 3; the others were stopped. Its log: {log}" in result.stderr
    assert "process 1 failed\n" in result.stderr  # The end of its log.


def test_local_term_stops_every_process(fake_python, tmp_path):
    proc = subprocess.Popen(
        ["bash", LOCAL, f"--python={fake_python}", "--port=12399", "--", f"--workdir={tmp_path}"],
        cwd=REPO,
        env=_env(SLEEP="60", PID_DIR=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_files = [tmp_path / str(i) for i in range(2)]
    deadline = time.monotonic() + 10
    while not all(f.is_file() and f.read_text().endswith("\n") for f in pid_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(f.read_text()) for f in pid_files]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143
    assert "terminated; all processes stopped" in err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# tpu_vm.sh

GCLOUD = "gcloud compute tpus tpu-vm"


def test_tpu_vm_create_exact():
    assert _lines(TPU_VM, "create", *TPU, "--dry-run") == [
        f"{GCLOUD} create mixer --zone=europe-west4-a --accelerator-type=v3-8 --version=tpu-ubuntu2204-base"
    ]
    assert _lines(TPU_VM, "create", *TPU, "--project=p1", "--accelerator_type=v4-32", "--version=v", "--dry-run") == [
        f"{GCLOUD} create mixer --zone=europe-west4-a --project=p1 --accelerator-type=v4-32 --version=v"
    ]


def test_tpu_vm_run_exact_and_remote_command_round_trips():
    main = ["--config=configs/digits.py", "--workdir=gs://bucket/my run", "--config.lr=1e-3"]
    lines = _lines(TPU_VM, "run", *TPU, "--dry-run", "--", *main)
    assert lines == [
        f"{GCLOUD} ssh mixer --zone=europe-west4-a --worker=all --command='cd ~/mixer_jax && nohup python3 -m "
        "mixer_jax.main --config=configs/digits.py --workdir='\\''gs://bucket/my run'\\'' --config.lr=1e-3 "
        "> ~/mixer_jax_run.log 2>&1 < /dev/null &'"
    ]
    remote = shlex.split(lines[0])[-1].removeprefix("--command=")
    assert shlex.split(remote) == [
        "cd",
        "~/mixer_jax",
        "&&",
        "nohup",
        "python3",
        "-m",
        "mixer_jax.main",
        *main,
        ">",
        "~/mixer_jax_run.log",
        "2>&1",
        "<",
        "/dev/null",
        "&",
    ]


def test_tpu_vm_run_passes_the_compilation_cache():
    """`--compilation_cache=DIR` becomes an assignment (bare name, quoted value) before nohup."""
    lines = _lines(TPU_VM, "run", *TPU, "--compilation_cache=gs://bucket/jax cache", "--dry-run", "--", "--config=c.py")
    remote = shlex.split(lines[0])[-1].removeprefix("--command=")
    assert remote.startswith("cd ~/mixer_jax && JAX_COMPILATION_CACHE_DIR='gs://bucket/jax cache' nohup python3 ")
    assert shlex.split(remote)[3:6] == ["JAX_COMPILATION_CACHE_DIR=gs://bucket/jax cache", "nohup", "python3"]


@pytest.mark.parametrize(
    "command, pieces",
    [
        ("create", ["create mixer", "--accelerator-type=v3-8", "--version=tpu-ubuntu2204-base"]),
        ("copy", ["scp /tmp/mixer_jax_mixer.tar.gz 'mixer:~/mixer_jax.tar.gz'", "--worker=all"]),
        ("setup", ["ssh mixer", "--worker=all", "python3 -m pip install -r requirements.txt", '"jax[tpu]==']),
        ("run", ["ssh mixer", "--worker=all", "nohup python3 -m mixer_jax.main --config=configs/digits.py"]),
        ("logs", ["ssh mixer", "--worker=0", "--command='tail -f ~/mixer_jax_run.log'"]),
        ("stop", ["ssh mixer", "--worker=all", 'pkill -f "mixer_jax[.]main"']),
        ("delete", ["delete mixer", "--quiet"]),
    ],
)
def test_tpu_vm_every_command_prints_gcloud(command, pieces):
    main = ["--", "--config=configs/digits.py"] if command == "run" else []
    lines = _lines(TPU_VM, command, *TPU, "--project=p1", "--dry-run", *main)
    gcloud = [line for line in lines if line.startswith(GCLOUD + " ")]
    assert gcloud, lines
    for piece in [*pieces, "--zone=europe-west4-a", "--project=p1"]:
        assert any(piece in line for line in gcloud), (piece, gcloud)


def test_tpu_vm_copy_leaves_out_git_and_venvs():
    lines = _lines(TPU_VM, "copy", *TPU, "--dry-run")
    assert lines[0] == (
        f"tar -C {REPO} --exclude=.git --exclude='.venv*' --exclude=runs --exclude=__pycache__ --exclude=.pytest_cache"
        " --exclude=.ruff_cache --exclude='*.egg-info' -czf /tmp/mixer_jax_mixer.tar.gz ."
    )
    assert "tar -xzf ~/mixer_jax.tar.gz -C ~/mixer_jax" in lines[2]
    assert lines[3] == "rm -f /tmp/mixer_jax_mixer.tar.gz"


def test_tpu_vm_setup_pins_the_jax_of_requirements():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        version = next(line.strip().split("==")[1] for line in f if line.startswith("jax=="))
    (line,) = _lines(TPU_VM, "setup", *TPU, "--dry-run")
    assert line.endswith(
        f"""--command='cd ~/mixer_jax && python3 -m pip install -r requirements.txt "jax[tpu]=={version}"'"""
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--zone=z"], "missing required option --name=NAME"),
        (["create", "--name=n"], "missing required option --zone=ZONE"),
        (["--name=n", "--zone=z"], "missing COMMAND"),
        (["launch", "--name=n", "--zone=z"], "unknown command 'launch'"),
        (["run", "--name=n", "--zone=z"], "run needs MAIN_ARGS after --"),
        (["logs", "--name=n", "--zone=z", "--", "--config=x"], "only run takes MAIN_ARGS"),
        (["create", "--name", "n", "--zone=z"], "option '--name' needs a value"),
        (["logs", "--name=n", "--zone=z", "--compilation_cache=gs://b/c"], "only run takes --compilation_cache"),
    ],
)
def test_tpu_vm_bad_arguments_exit_2(args, message):
    result = _run(TPU_VM, *args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr


# slurm.sbatch


def test_slurm_dry_run_exact():
    args = ["--config=configs/l16_i21k.py", "--workdir=/shared/runs/l16"]
    expected = (
        "srun --kill-on-bad-exit=1 python -m mixer_jax.main --config=configs/l16_i21k.py --workdir=/shared/runs/l16"
    )
    assert _lines(SLURM, "--dry-run", *args) == [expected]
    assert _lines(SLURM, *args, "--dry-run") == [expected]
    lines = _lines(SLURM, "--dry-run", "--config", "configs/a b.py", "--config.lr=1e-3", "--", "--verbosity=1")
    assert lines == [
        r"srun --kill-on-bad-exit=1 python -m mixer_jax.main --config configs/a\ b.py --config.lr=1e-3 "
        "--verbosity=1"
    ]


def test_slurm_sets_the_local_devices_of_each_task():
    args = ["--dry-run", "--config=configs/digits.py"]
    srun = "srun --kill-on-bad-exit=1 python -m mixer_jax.main --config=configs/digits.py"
    per_gpu = _lines(SLURM, *args, env=_env(SLURM_GPUS_PER_TASK="1", SLURM_CPUS_PER_TASK="8"))
    assert per_gpu == ["export JAX_LOCAL_DEVICE_IDS=0", "export SRUN_CPUS_PER_TASK=8", srun]
    per_host = _lines(SLURM, *args, env=_env(SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8"))
    assert per_host == ["export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", srun]
    assert _lines(SLURM, *args, env=_env(SLURM_GPUS_PER_TASK="1", JAX_LOCAL_DEVICE_IDS="3")) == [srun]


def test_slurm_header_defaults():
    with open(os.path.join(REPO, SLURM)) as f:
        directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    for expected in [
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-task=1",
        "--cpus-per-task=8",
        "--time=24:00:00",
        "--output=slurm-%j.out",
    ]:
        assert expected in directives


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run"], "no MAIN_ARGS"),
        (["--config=configs/digits.py"], "not inside a SLURM job"),
        (["--config=configs/digits.py", "--dryrun"], "unknown option '--dryrun'"),
    ],
)
def test_slurm_bad_arguments_exit_2(args, message):
    result = _run(SLURM, *args)
    assert result.returncode == 2
    assert message in result.stderr
