# shellcheck shell=bash
# Shared by train.sbatch, sweep.sbatch and encode.sbatch: sourced, never run on its own.
#
# Launch model: `srun` starts one task per GPU on every node of the allocation (no torchrun). Each
# task is the Python program itself, so:
#   * signals reach the ranks without a middleman: the batch shell forwards SIGUSR1 to srun, and srun
#     forwards it to every task (torchrun would die of SIGUSR1, SIGKILL its workers 30 s after
#     SIGTERM, and turn the ranks' exit code 75 into 1);
#   * srun's exit status is the highest of its tasks' statuses, so 75 (saved, requeue me) arrives here;
#   * ranks come from Slurm: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID become RANK /
#     WORLD_SIZE / LOCAL_RANK (calm_pretrain.parallel.distributed.init_distributed for training, the task
#     wrapper CALM_RANKS_FROM_SLURM for `calm-data encode`), with MASTER_ADDR / MASTER_PORT exported here.
#
# Signal flow: Slurm sends SIGUSR1 to this batch shell (`#SBATCH --signal=B:USR1@120`; SIGTERM on
# preemption or at the time limit) → the trap below sends SIGUSR1 to srun — never SIGTERM: srun answers
# SIGTERM by SIGKILLing its tasks ("forcing job termination") → srun forwards SIGUSR1 to every rank →
# the ranks agree at the next step boundary, save a checkpoint, exit 75 → `scontrol requeue` → the
# requeued job (same job id, same run directory) resumes from checkpoints/latest.
#
# Environment knobs (export before sbatch; sbatch passes the submitting shell's environment on):
#   RUN_DIR            run directory (default: the config's train.output_dir, made absolute)
#   NPROC_PER_NODE     processes per node, whatever the device (CPU runs: default 1)
#   GPUS_PER_NODE      GPUs per node (default: SLURM_GPUS_ON_NODE, else the GPUs `nvidia-smi -L` lists)
#   PYTHON             interpreter with calm_pretrain installed (default python3)
#   CALM_ENV_SETUP     a file sourced first (module load / conda activate / venv)
#   CALM_MASTER_ADDR   rendezvous host (default: the first host of the allocation)
#   CALM_MASTER_PORT   rendezvous port (default: 15000 + SLURM_JOB_ID % 15000, stable across requeues)
#   SRUN_ARGS          extra srun options, split on whitespace (e.g. "--cpus-per-task=12 --label")
#   MAX_REQUEUES       stop requeueing once SLURM_RESTART_COUNT reaches this (default: no limit)

REQUEUE_EXIT_CODE=75  # calm_pretrain.train.signals.REQUEUE_EXIT_CODE (EX_TEMPFAIL: "try again")

_calm_signal=""      # first signal the batch shell received (USR1 / TERM), empty if none
_calm_got_signal=0   # set by the trap: tells the wait loop that `wait` was interrupted
_calm_pid=""         # srun's pid while a step runs
CALM_RUN_LOG=""      # a second copy of this script's log lines (the run directory's slurm.log)

calm_log() {
  local line
  line="[calm-slurm $(date '+%Y-%m-%d %H:%M:%S')] $*"
  printf '%s\n' "$line"
  if [[ -n $CALM_RUN_LOG ]]; then printf '%s\n' "$line" >>"$CALM_RUN_LOG" || true; fi
}

calm_die() {
  calm_log "error: $*" >&2
  exit 2
}

# calm_int NAME VALUE: VALUE must be a non-negative integer (it goes into shell arithmetic).
calm_int() {
  [[ $2 =~ ^[0-9]+$ ]] || calm_die "$1 must be a non-negative integer, got '$2'"
}

_calm_on_signal() {
  local sig=$1
  _calm_got_signal=1
  [[ -n $_calm_signal ]] || _calm_signal=$sig
  if [[ -n $_calm_pid ]]; then
    calm_log "batch shell received SIG${sig}: forwarding SIGUSR1 to every rank through srun (each saves at" \
      "the next step boundary, then exits ${REQUEUE_EXIT_CODE})"
    kill -s USR1 "$_calm_pid" 2>/dev/null || true
  else
    calm_log "batch shell received SIG${sig} while no step runs: nothing to forward"
  fi
}

# Installed as soon as this file is sourced: an untrapped SIGUSR1 would kill the batch shell.
trap '_calm_on_signal USR1' USR1
trap '_calm_on_signal TERM' TERM

# calm_master_port JOB_ID: the job's rendezvous port, stable across requeues. Python's copy, for srun
# steps that find no MASTER_PORT: calm_pretrain.parallel.distributed.master_port_for_job (keep both alike;
# tests/test_slurm.py compares them).
calm_master_port() {
  echo $(( 15000 + $1 % 15000 ))
}

# calm_init: the allocation, the processes per node and the rendezvous; environment for every task.
calm_init() {
  [[ -n ${SLURM_JOB_ID:-} ]] || calm_die "SLURM_JOB_ID is not set: submit this script with sbatch"
  calm_int SLURM_JOB_ID "$SLURM_JOB_ID"
  calm_int SLURM_RESTART_COUNT "${SLURM_RESTART_COUNT:-0}"
  if [[ -n ${CALM_ENV_SETUP:-} ]]; then
    set +u  # activation scripts (conda, modules) often read unset variables
    # shellcheck source=/dev/null
    source "$CALM_ENV_SETUP"
    set -u
  fi
  PYTHON=${PYTHON:-python3}

  local nodes
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  mapfile -t CALM_NODES <<<"$nodes"
  [[ -n ${CALM_NODES[0]:-} ]] || calm_die "no hosts in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  CALM_NNODES=${SLURM_NNODES:-${#CALM_NODES[@]}}
  calm_int SLURM_NNODES "$CALM_NNODES"

  local gpus="" origin
  if [[ -n ${NPROC_PER_NODE:-} ]]; then
    CALM_NPROC_PER_NODE=$NPROC_PER_NODE origin="NPROC_PER_NODE"
  elif [[ -n ${GPUS_PER_NODE:-} ]]; then
    CALM_NPROC_PER_NODE=$GPUS_PER_NODE origin="GPUS_PER_NODE"
  else
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
      gpus=$SLURM_GPUS_ON_NODE origin="SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true) origin="nvidia-smi -L"
    fi
    if [[ -n $gpus && $gpus != 0 ]]; then
      CALM_NPROC_PER_NODE=$gpus
    else
      CALM_NPROC_PER_NODE=1 origin="no GPU found: CPU run; set NPROC_PER_NODE for more processes"
    fi
  fi
  calm_int "processes per node ($origin)" "$CALM_NPROC_PER_NODE"
  (( CALM_NPROC_PER_NODE > 0 )) || calm_die "processes per node ($origin) must be at least 1"
  CALM_NPROC_SOURCE=$origin
  CALM_WORLD_SIZE=$(( CALM_NNODES * CALM_NPROC_PER_NODE ))

  # The rank layout comes from Slurm; a RANK left over in the submitting shell would override it.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  # Set here, never inherited: a MASTER_ADDR=localhost from a single-node experiment in the
  # submitting shell would make a multi-node job hang at the rendezvous.
  export MASTER_ADDR=${CALM_MASTER_ADDR:-${CALM_NODES[0]}}
  export MASTER_PORT=${CALM_MASTER_PORT:-$(calm_master_port "$SLURM_JOB_ID")}
  calm_int CALM_MASTER_PORT "$MASTER_PORT"

  # NCCL: a failed or timed-out collective aborts the communicator and raises in every rank, so the
  # job fails (and frees its nodes) instead of hanging. The timeout is train.dist_timeout_minutes (a
  # config key / override, logged at start); raise it for slow first steps or checkpoint loads.
  # TORCH_NCCL_* is the name since torch 2.2, NCCL_ASYNC_ERROR_HANDLING the older one.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
  # WARN: problems only. NCCL_DEBUG=INFO prints the rings/trees and transports (IB, sockets) it picked:
  # the first thing to look at when a multi-node job hangs at init or runs slowly.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # NCCL_SOCKET_IFNAME / NCCL_IB_HCA (which network NCCL uses) depend on the cluster: left to you.
  # One OpenMP thread per rank unless the job gives each task more cores (as torchrun does).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

  CALM_SRUN=(srun --nodes="$CALM_NNODES" --ntasks-per-node="$CALM_NPROC_PER_NODE" --ntasks="$CALM_WORLD_SIZE")
  if [[ -n ${SRUN_ARGS:-} ]]; then
    local extra
    read -r -a extra <<<"$SRUN_ARGS"
    CALM_SRUN+=("${extra[@]}")
  fi
}

calm_log_job() {
  calm_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}" \
    "${SLURM_ARRAY_TASK_ID:+array task ${SLURM_ARRAY_TASK_ID} }on ${CALM_NNODES} node(s): ${CALM_NODES[*]}"
  calm_log "${CALM_NPROC_PER_NODE} process(es) per node (${CALM_NPROC_SOURCE}), world size ${CALM_WORLD_SIZE};" \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
}

# calm_resolve_run CONFIG [OVERRIDES...]: validate the config here (one process, before N ranks start)
# and fix the run directory: RUN_DIR, else train.output_dir, made absolute against the submit
# directory, so every rank and every requeue of this job writes to the same place.
# Sets CALM_RUN_DIR, CALM_RUN_NAME, CALM_DIST_TIMEOUT and CALM_RUN_OVERRIDE (train.output_dir=...).
calm_resolve_run() {
  local out
  out=$(RUN_DIR="${RUN_DIR:-}" "$PYTHON" - "$@" <<'PY'
import json, os, sys
from calm_pretrain.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"config error: {e}")
run_dir = os.path.abspath(os.environ.get("RUN_DIR") or cfg.train.output_dir)
if "\n" in run_dir or "\n" in cfg.name:
    sys.exit("config error: newline in the run directory or run name")
# A JSON string is a YAML string: the override survives spaces, '#', ': ' in the path.
print(run_dir, cfg.name, cfg.train.dist_timeout_minutes, "train.output_dir=" + json.dumps(run_dir), sep="\n")
PY
  ) || calm_die "cannot resolve the run config '$1' (see above)"
  local fields
  mapfile -t fields <<<"$out"
  (( ${#fields[@]} == 4 )) || calm_die "unexpected output while resolving '$1': $out"
  CALM_RUN_DIR=${fields[0]} CALM_RUN_NAME=${fields[1]} CALM_DIST_TIMEOUT=${fields[2]} CALM_RUN_OVERRIDE=${fields[3]}
}

# The task command for programs that read RANK / WORLD_SIZE / LOCAL_RANK themselves (calm-data
# encode): `calm_step "${CALM_RANKS_FROM_SLURM[@]}" CMD...` maps Slurm's task variables, then execs
# CMD (so signals reach it directly).
# shellcheck disable=SC2016,SC2034  # expanded by each task's shell; used by encode.sbatch
CALM_RANKS_FROM_SLURM=(bash -c 'export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_STEP_NUM_TASKS" LOCAL_RANK="$SLURM_LOCALID"; exec "$@"' calm-task)

# calm_requeue: put this job back in the queue (same id, same run directory); it resumes from latest.
calm_requeue() {
  local count=${SLURM_RESTART_COUNT:-0}
  if [[ -n ${MAX_REQUEUES:-} ]]; then
    calm_int MAX_REQUEUES "$MAX_REQUEUES"
    if (( count >= MAX_REQUEUES )); then
      calm_log "not requeued: restart ${count} reached MAX_REQUEUES=${MAX_REQUEUES}; submit again to continue"
      return 0
    fi
  fi
  calm_log "requeueing job ${SLURM_JOB_ID} (restart $(( count + 1 ))); the next run resumes from checkpoints/latest"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    calm_log "scontrol requeue ${SLURM_JOB_ID} failed (job cancelled, or requeue disabled on this cluster):" \
      "submit the same command again to resume"
  fi
}

# calm_step CMD...: run CMD under srun with the signal forwarding above; the job's outcome:
#   0 → done; 75, or any failure after the batch shell was signalled → requeue, return 75;
#   anything else → a real failure: return it, no requeue.
calm_step() {
  if [[ -n $_calm_signal ]]; then
    calm_log "SIG${_calm_signal} arrived before the launch"
    calm_requeue
    return "$REQUEUE_EXIT_CODE"
  fi
  "${CALM_SRUN[@]}" "$@" &
  _calm_pid=$!
  # `wait` returns early (status > 128) when a trapped signal arrives; the trap has run by then, and
  # waiting again collects srun's real status. (If srun's own status was > 128 and a signal came in at
  # that moment, the second wait finds no child (127): keep the first status.)
  local rc previous=""
  while :; do
    _calm_got_signal=0
    rc=0
    wait "$_calm_pid" 2>/dev/null || rc=$?
    if (( rc == 127 )) && [[ -n $previous ]]; then rc=$previous; break; fi
    (( _calm_got_signal && rc > 128 )) || break
    previous=$rc
  done
  _calm_pid=""

  if (( rc == 0 )); then
    calm_log "finished (exit 0)"
    return 0
  fi
  if (( rc == REQUEUE_EXIT_CODE )); then
    calm_log "the ranks saved a checkpoint and exited ${REQUEUE_EXIT_CODE}"
  elif [[ -n $_calm_signal ]]; then
    calm_log "exit ${rc} after SIG${_calm_signal}: the ranks were stopped before they could save; the" \
      "requeued job resumes from the last checkpoint"
  else
    calm_log "failed with exit ${rc}: not requeued (look for the first rank that failed above)"
    return "$rc"
  fi
  calm_requeue
  return "$REQUEUE_EXIT_CODE"
}

# calm_train CONFIG [OVERRIDES...]: the whole training launch (train.sbatch and sweep.sbatch).
calm_train() {
  local config=$1
  shift
  [[ -f $config ]] || calm_die "config file not found: $config"
  calm_resolve_run "$config" "$@"
  mkdir -p "$CALM_RUN_DIR"
  CALM_RUN_LOG=$CALM_RUN_DIR/slurm.log
  calm_log_job
  calm_log "run ${CALM_RUN_NAME}: config ${config}${*:+ $*}; run directory ${CALM_RUN_DIR};" \
    "collective timeout ${CALM_DIST_TIMEOUT} min (train.dist_timeout_minutes)"
  calm_step "$PYTHON" -m calm_pretrain.cli train --config "$config" "$@" "$CALM_RUN_OVERRIDE"
}

