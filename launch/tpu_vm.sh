#!/usr/bin/env bash
# Manages a Cloud TPU VM (one host or a pod slice) with `gcloud compute tpus tpu-vm`: create it, copy
# this repository to every worker, install the dependencies, start a run, follow it, stop, delete.
# The same command runs on every worker; jax.distributed finds the other workers by itself.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [--project=PROJECT]
                        [--accelerator_type=TYPE] [--version=VERSION] [--python=PYTHON]
                        [--compilation_cache=DIR] [--dry-run] [-- MAIN_ARGS...]

Commands:
  create  create the TPU VM (--accelerator_type, default v3-8; --version, default tpu-ubuntu2204-base)
  copy    copy this repository's working tree, without .git, .venv*, runs/ and caches, to
          ~/mixer_jax on every worker (as a tarball: one scp, then unpacked in place)
  setup   pip install requirements.txt and jax[tpu] on every worker
  run     start `PYTHON -m mixer_jax.main MAIN_ARGS` in the background on every worker,
          output in ~/mixer_jax_run.log
  logs    follow worker 0's ~/mixer_jax_run.log
  stop    stop the run on every worker (TERM, then KILL after 10 s)
  delete  delete the TPU VM

Options:
  --name=NAME               TPU name (required)
  --zone=ZONE               zone, e.g. europe-west4-a (required)
  --project=PROJECT         Google Cloud project (default: gcloud's configured project)
  --accelerator_type=TYPE   for create (default v3-8)
  --version=VERSION         TPU software version, for create (default tpu-ubuntu2204-base)
  --python=PYTHON           interpreter on the workers, for setup and run (default python3);
                            the pinned requirements need Python 3.11 or newer
  --compilation_cache=DIR   for run: JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR),
                            a directory every worker reads, e.g. gs://BUCKET/jax_cache; a relaunch
                            (after preemption, say) loads its compiled steps instead of compiling
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                show this help

Example:
  launch/tpu_vm.sh create --name=mixer --zone=europe-west4-a --accelerator_type=v3-8
  launch/tpu_vm.sh copy   --name=mixer --zone=europe-west4-a
  launch/tpu_vm.sh setup  --name=mixer --zone=europe-west4-a
  launch/tpu_vm.sh run    --name=mixer --zone=europe-west4-a -- --config=configs/digits.py --workdir=runs/digits
  launch/tpu_vm.sh logs   --name=mixer --zone=europe-west4-a
  launch/tpu_vm.sh delete --name=mixer --zone=europe-west4-a
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  echo "Try 'launch/tpu_vm.sh --help'." >&2
  exit 2
}

command=''
name=''
zone=''
project=''
accelerator_type=v3-8
version='tpu-ubuntu2204-base'
python=python3
compilation_cache=''
dry_run=0
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --compilation_cache=*) compilation_cache=${1#*=} ;;
    --name | --zone | --project | --accelerator_type | --version | --python | --compilation_cache)
      die "option '$1' needs a value: $1=VALUE"
      ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && break ;;
    -*) die "unknown option '$1' (mixer_jax.main's arguments go after --)" ;;
    *)
      [[ -z $command ]] || die "unexpected argument '$1' after command '$command'"
      command=$1
      ;;
  esac
  shift
done
main_args=("$@")

case $command in
  create | copy | setup | run | logs | stop | delete) ;;
  '') die "missing COMMAND: one of create, copy, setup, run, logs, stop, delete" ;;
  *) die "unknown command '$command': use one of create, copy, setup, run, logs, stop, delete" ;;
esac
[[ -n $name ]] || die "missing required option --name=NAME (the TPU's name)"
[[ -n $zone ]] || die "missing required option --zone=ZONE (e.g. --zone=europe-west4-a)"
if [[ $command == run ]]; then
  ((${#main_args[@]})) || die "run needs MAIN_ARGS after --, e.g. -- --config=configs/digits.py --workdir=runs/digits"
else
  ((${#main_args[@]} == 0)) || die "only run takes MAIN_ARGS after --, not $command"
  [[ -z $compilation_cache ]] || die "only run takes --compilation_cache, not $command"
fi

# Shell quoting that leaves plain words bare and single-quotes the rest (only the value of --flag=).
quote() {
  local word out=()
  for word; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    elif [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      out+=("${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}")
    else
      out+=("${word@Q}")
    fi
  done
  echo "${out[*]}"
}

# Prints a command (--dry-run), or echoes it to stderr and runs it.
run() {
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
ssh_all() { run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"; }

case $command in
  create)
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" --version="$version"
    ;;
  copy)
    # The working tree as it is (uncommitted edits included), less what .gitignore keeps out of
    # git: one file to copy, unpacked over ~/mixer_jax so that runs/ already there stays.
    tarball=${TMPDIR:-/tmp}/mixer_jax_$name.tar.gz
    run tar -C "$repo" --exclude=.git --exclude='.venv*' --exclude=runs --exclude=__pycache__ \
      --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.egg-info' -czf "$tarball" .
    run "${tpu[@]}" scp "$tarball" "$name:~/mixer_jax.tar.gz" "${where[@]}" --worker=all
    ssh_all 'mkdir -p ~/mixer_jax && tar -xzf ~/mixer_jax.tar.gz -C ~/mixer_jax && rm ~/mixer_jax.tar.gz'
    run rm -f "$tarball"
    ;;
  setup)
    jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
    [[ -n $jax_version ]] || die "no jax==VERSION pin in $repo/requirements.txt"
    ssh_all "cd ~/mixer_jax && $(quote "$python") -m pip install -r requirements.txt \"jax[tpu]==$jax_version\""
    ;;
  run)
    # Detached (nohup, no stdin) so that the run outlives the ssh session.
    cache=${compilation_cache:+JAX_COMPILATION_CACHE_DIR=$(quote "$compilation_cache") }
    ssh_all "cd ~/mixer_jax && ${cache}nohup $(quote "$python" -m mixer_jax.main "${main_args[@]}") > ~/mixer_jax_run.log 2>&1 < /dev/null &"
    ;;
  logs)
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command='tail -f ~/mixer_jax_run.log'
    ;;
  stop)
    # TERM, then KILL 10 s later: once a process has joined jax.distributed (a pod slice), it takes
    # TERM as a preemption notice and goes on. [.] keeps the pattern from matching this shell.
    ssh_all 'pkill -f "mixer_jax[.]main" && sleep 10 && pkill -KILL -f "mixer_jax[.]main"; true'
    ;;
  delete)
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
esac
