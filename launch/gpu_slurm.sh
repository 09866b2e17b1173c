#!/usr/bin/env bash
#SBATCH --job-name=tfusion
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# Train on GPU nodes under SLURM, one process per GPU (8 per node); submit from the repo checkout:
#   sbatch --nodes=N launch/gpu_slurm.sh EXPERIMENT WORKDIR [extra flags...]
#   sbatch --nodes=4 launch/gpu_slurm.sh experiments/shapes_tiny.py /shared/runs/shapes --config.total_steps=1000
#
# WORKDIR must be on a filesystem that every node sees at the same path (all processes write one
# Orbax checkpoint together). The #SBATCH values above are defaults; sbatch options override them.
# Environment (sbatch passes the submitting shell's environment on to the job):
#   REPO_DIR          checkout to run from (default: the directory sbatch was called from)
#   PYTHON            interpreter (default python3)
#   COORDINATOR_PORT  TCP port of the coordinator on the first node (default 61234; outside Linux's
#                     default ephemeral range 32768-60999, so outgoing connections do not hold it)
#
# Coordinates. Every task gets --coordinator_address=<first host of the job>:COORDINATOR_PORT,
# --num_processes=$SLURM_NTASKS and --process_id=$SLURM_PROCID explicitly. JAX 0.10 could detect these
# by itself (jax/_src/clusters/slurm_cluster.py, active when SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID are all set): coordinator = first host of
# SLURM_STEP_NODELIST on port 61440 + SLURM_JOB_ID % 4096 (or $JAX_COORDINATOR_PORT), process
# count = SLURM_NTASKS, process id = SLURM_PROCID, and local device ids = [SLURM_LOCALID].
# Passing them keeps this script working if that detection changes.
#
# GPU per task. Even with the three flags given, jax.distributed.initialize still runs the SLURM
# detection for the local device ids (it does whenever any of coordinator, count, id, device ids is
# unset) and would restrict each process to CUDA device number SLURM_LOCALID. That is wrong when
# SLURM already hands each task a single GPU (--gpus-per-task, --gpu-bind): that GPU is device 0.
# So each task here sets CUDA_VISIBLE_DEVICES to exactly its own GPU (entry SLURM_LOCALID of the
# GPUs the step can see, or the only one if SLURM bound it already) and JAX_LOCAL_DEVICE_IDS=0, which
# JAX reads instead of detecting.
set -euo pipefail

if (( $# < 2 )); then
  sed -n '10,11p' "$0" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "gpu_slurm.sh runs inside a SLURM allocation: submit it with sbatch" >&2
  exit 2
fi

cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}"
coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export TFUSION_COORDINATOR="$coordinator_host:${COORDINATOR_PORT:-61234}"
export TFUSION_PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
echo "job $SLURM_JOB_ID: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} node(s), coordinator $TFUSION_COORDINATOR," \
     "in $PWD" >&2

# One task per GPU. The per-task part is in single quotes: SLURM_PROCID and SLURM_LOCALID differ
# between tasks, so they are expanded by each task's own shell. Arguments go through as "$@".
# --kill-on-bad-exit: if one process dies the others would block in collectives; end the step.
srun_args=(--kill-on-bad-exit=1 --label)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then  # srun of SLURM 22.05+ does not take this from sbatch
  srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
# shellcheck disable=SC2016
srun "${srun_args[@]}" bash -c '
  set -euo pipefail
  IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
  if (( ${#gpus[@]} > 1 )); then
    export CUDA_VISIBLE_DEVICES=${gpus[SLURM_LOCALID]}
  elif (( ${#gpus[@]} == 0 )); then
    export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  fi
  export JAX_LOCAL_DEVICE_IDS=0
  exec "$TFUSION_PYTHON" -m tfusion.train --config "$1" --workdir "$2" \
      --coordinator_address="$TFUSION_COORDINATOR" --num_processes="$SLURM_NTASKS" \
      --process_id="$SLURM_PROCID" "${@:3}"
' tfusion-task "$@"
