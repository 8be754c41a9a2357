#!/usr/bin/env bash
# Runs mixer_jax.main as N cooperating processes on this machine, each with M fake CPU devices:
# a multi-process run without a cluster (the tests use it). Process 0 prints to the console.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [--num_processes=N] [--devices_per_process=M] [--port=P] [--python=PYTHON]
                       [--dry-run] -- MAIN_ARGS...

Starts N processes of `PYTHON -m mixer_jax.main MAIN_ARGS` on 127.0.0.1, each with M fake CPU
devices, joined through the coordinator at 127.0.0.1:P.

  --num_processes=N        processes to start (default 2)
  --devices_per_process=M  fake CPU devices per process (default 4)
  --port=P                 coordinator port (default: a free port; 12355 with --dry-run)
  --python=PYTHON          Python interpreter (default python)
  --dry-run                print the command of each process, one per line, and run nothing
  -h, --help               show this help

Process 0's output goes to the console and to LOG_DIR/process_0.log; process i's to
LOG_DIR/process_i.log, where LOG_DIR is WORKDIR/logs for --workdir=WORKDIR in MAIN_ARGS (a new
temporary directory otherwise). If a process fails, the others are stopped and the script exits
with its status. Ctrl-C or TERM stops all processes.

Example:
  launch/local.sh --num_processes=2 --devices_per_process=4 -- --config=configs/digits.py --workdir=runs/digits_2proc
EOF
}

die() {
  echo "local.sh: error: $*" >&2
  echo "Try 'launch/local.sh --help'." >&2
  exit 2
}

num_processes=2
devices=4
port=
python=python
dry_run=0
while (($#)); do
  case $1 in
    --num_processes=*) num_processes=${1#*=} ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --num_processes | --devices_per_process | --port | --python) die "option '$1' needs a value: $1=VALUE" ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && break ;;
    *) die "unknown option '$1' (mixer_jax.main's arguments go after --)" ;;
  esac
  shift
done
main_args=("$@")

[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer, not '$num_processes'"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer, not '$devices'"
[[ -z $port || ($port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535) ]] || die "--port must be a port number, not '$port'"
[[ -n $python ]] || die "--python must name an interpreter"
((${#main_args[@]})) || die "no MAIN_ARGS after --, e.g. -- --config=configs/digits.py --workdir=runs/digits_2proc"

if [[ -z $port ]]; then
  if ((dry_run)); then
    port=12355 # Fixed, so that the printed commands are deterministic.
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
      die "could not pick a free port with '$python'; pass --port=P"
    [[ $port =~ ^[0-9]+$ ]] || die "could not pick a free port with '$python' (it printed '$port'); pass --port=P"
  fi
fi

# The caller's XLA flags (dumps, experiments) are kept, less a device count of theirs.
xla_flags=
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done

# The command of process $1, in the array `cmd`. Transparent huge pages for glibc's large blocks:
# XLA:CPU maps each step's temporary buffer afresh, and 4 KiB pages make that 680,000 page faults
# per S/16 step (README, Benchmarks). A GLIBC_TUNABLES of the caller's own wins.
command_of() {
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${xla_flags}--xla_force_host_platform_device_count=$devices"
    "GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
    "$python" -m mixer_jax.main "${main_args[@]}"
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$1")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    line=$(printf '%q ' "${cmd[@]}")
    echo "${line% }"
  done
  exit 0
fi

# Logs go to WORKDIR/logs (the last --workdir wins, as in absl), or to a new temporary directory.
workdir=
for ((i = 0; i < ${#main_args[@]}; i++)); do
  case ${main_args[i]} in
    --workdir=*) workdir=${main_args[i]#*=} ;;
    --workdir) workdir=${main_args[i + 1]:-} ;;
  esac
done
if [[ -n $workdir ]]; then
  log_dir=$workdir/logs
  mkdir -p "$log_dir"
else
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/mixer_jax_local.XXXXXX")
fi
echo "local.sh: $num_processes process(es) x $devices CPU device(s), coordinator 127.0.0.1:$port, logs in $log_dir" >&2

# Background processes ignore the terminal's Ctrl-C (bash starts them so); the traps stop them all.
# A process that has joined jax.distributed takes TERM as a preemption notice and keeps running,
# so whatever still runs $grace_s seconds after TERM gets KILL.
grace_s=10
pids=()    # pids[i]: the PID of process i
running=() # pids not yet reaped
kill_at=   # when set, the time (in $SECONDS) to send KILL
stop_all() {
  ((${#running[@]})) || return 0
  kill -TERM "${running[@]}" 2>/dev/null || true
  [[ -n $kill_at ]] || kill_at=$((SECONDS + grace_s))
}
signal=
trap 'signal=INT; stop_all' INT
trap 'signal=TERM; stop_all' TERM

# Process 0 writes into a FIFO that tee copies to the console and its log: unlike a pipeline, this
# keeps the PID of the process itself, and waiting for tee at the end flushes its last lines.
fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/mixer_jax_local.XXXXXX")
trap 'rm -rf "$fifo_dir"' EXIT
mkfifo "$fifo_dir/process_0"
tee "$log_dir/process_0.log" <"$fifo_dir/process_0" &
tee_pid=$!
for ((i = 0; i < num_processes; i++)); do
  if ((i > 0)) && [[ -n $signal ]]; then
    break # Stopped while starting; process 0 has started, so tee ends.
  fi
  command_of "$i"
  if ((i == 0)); then
    "${cmd[@]}" </dev/null >"$fifo_dir/process_0" 2>&1 &
  else
    "${cmd[@]}" </dev/null >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids[i]=$!
  running+=("$!")
done
if [[ -n $signal ]]; then
  stop_all # A signal that came before any process ran stopped nothing.
fi

# Reap processes as they end; the first failure stops the rest. `wait -n` returns when one ends or
# a signal arrives (and skips processes bash has already reaped), so each round checks every
# process, and `wait PID` gives the status of one that has ended.
failed=''
failed_status=0
while ((${#running[@]})); do
  if [[ -z $kill_at ]]; then
    wait -n "${running[@]}" 2>/dev/null || true
  elif ((SECONDS < kill_at)); then
    sleep 0.2
  else
    echo "local.sh: process(es) still running ${grace_s}s after TERM; sending KILL" >&2
    kill -KILL "${running[@]}" 2>/dev/null || true
    wait -n "${running[@]}" 2>/dev/null || true
  fi
  still_running=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still_running+=("$pid")
      continue
    fi
    status=0
    wait "$pid" || status=$?
    if ((status != 0)) && [[ -z $failed && -z $signal ]]; then
      for i in "${!pids[@]}"; do
        [[ ${pids[i]} != "$pid" ]] || failed=$i
      done
      failed_status=$status
    fi
  done
  running=("${still_running[@]}")
  [[ -z $failed || -n $kill_at ]] || stop_all
done

wait "$tee_pid" || true

case $signal in
  INT) echo "local.sh: interrupted; all processes stopped" >&2 && exit 130 ;;
  TERM) echo "local.sh: terminated; all processes stopped" >&2 && exit 143 ;;
esac
if [[ -n $failed ]]; then
  log=$log_dir/process_$failed.log
  if ((failed != 0)); then
    echo "local.sh: last lines of $log:" >&2
    tail -n 20 "$log" >&2
  fi
  echo "local.sh: process $failed failed with exit status $failed_status; the others were stopped. Its log: $log" >&2
  exit "$failed_status"
fi
