#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice: the same command runs on every worker, one process each.
#   launch/tpu_pod.sh TPU_NAME ZONE EXPERIMENT WORKDIR [extra flags...]
#   SETUP=1 TPU_PROJECT=my-project launch/tpu_pod.sh my-v5e-32 us-west4-a experiments/shapes_tiny.py \
#       gs://my-bucket/tfusion/shapes --config.total_steps=1000
#
# WORKDIR must be one location that every worker reads and writes: a gs:// bucket path, or a shared
# filesystem mounted at the same path on all workers. All hosts write one Orbax checkpoint together
# and read it back on resume; a per-worker local directory breaks the save.
# The repository must already be checked out, at the same commit, in REPO_DIR on every worker
# (default ~/tfusion, expanded on the worker). The workers find each other themselves: the command
# passes --distributed=on and JAX reads the slice layout from the TPU VM metadata.
#
# Environment:
#   REPO_DIR     checkout on the workers (default ~/tfusion)
#   TPU_PROJECT  GCP project of the TPU (adds --project); default: gcloud's configured project
#   SETUP=1      first run `pip install -e .[tpu]` in REPO_DIR on all workers
#   PYTHON       interpreter on the workers (default python3)
# Stopping this script (Ctrl-C) may leave the trainers running on the workers; to stop them, run
# `gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command "pkill -f tfusion.train"`.
set -euo pipefail

if (( $# < 4 )); then
  sed -n '2,5p' "$0" >&2
  exit 2
fi
tpu_name=$1 zone=$2 experiment=$3 workdir=$4
shift 4
# shellcheck disable=SC2088  # the ~ is expanded on the worker, not here
repo_dir=${REPO_DIR:-"~/tfusion"}
python=${PYTHON:-python3}

if [[ $workdir != gs://* ]]; then
  echo "note: WORKDIR '$workdir' is not a gs:// path; it must be a filesystem shared by all workers" >&2
fi

# The remote command is a bash command line; quote every piece with printf %q so that paths and flag
# values containing spaces or shell characters arrive unchanged. A leading ~ becomes the worker's
# $HOME, expanded by the worker's shell.
# shellcheck disable=SC2016,SC2088  # "~" and $HOME are for the worker's shell
case $repo_dir in
  "~") remote_dir='"$HOME"' ;;
  "~/"*) remote_dir='"$HOME"/'$(printf '%q' "${repo_dir#"~/"}") ;;
  *) remote_dir=$(printf '%q' "$repo_dir") ;;
esac
train=$(printf '%q ' "$python" -m tfusion.train --config "$experiment" --workdir "$workdir" --distributed=on "$@")
setup=$(printf '%q ' "$python" -m pip install -e ".[tpu]")

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all)
if [[ -n ${TPU_PROJECT:-} ]]; then
  gcloud_ssh+=(--project "$TPU_PROJECT")
fi

if [[ ${SETUP:-0} == 1 ]]; then
  echo "installing on all workers of $tpu_name: cd $repo_dir && $setup" >&2
  "${gcloud_ssh[@]}" --command "set -e; cd $remote_dir && $setup"
fi

echo "training on all workers of $tpu_name: cd $repo_dir && $train" >&2
exec "${gcloud_ssh[@]}" --command "set -e; cd $remote_dir && PYTHONUNBUFFERED=1 exec $train"
