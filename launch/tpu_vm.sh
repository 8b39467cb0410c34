#!/usr/bin/env bash
# Cloud TPU VM slices (multi-host) for tuna-jax: create, set up, run, copy results back, delete.
#
#   ACCELERATOR_TYPE=v4-32 SPOT=1 TPU_NAME=tuna-v4 ZONE=us-central2-b ./launch/tpu_vm.sh create
#   TPU_NAME=tuna-v4 ZONE=us-central2-b ./launch/tpu_vm.sh setup
#   TPU_NAME=tuna-v4 ZONE=us-central2-b ./launch/tpu_vm.sh train configs/tuna_p.yaml train.output_dir=gs://b/tuna-p
#   TPU_NAME=tuna-v4 ZONE=us-central2-b ./launch/tpu_vm.sh copy logs ./logs
#   TPU_NAME=tuna-v4 ZONE=us-central2-b ./launch/tpu_vm.sh delete
#
# Commands:
#   create            gcloud compute tpus tpu-vm create, from ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT, PREEMPTIBLE
#   setup             on every worker: clone or update the repository, install jax[tpu] and tuna-jax[gcs]
#   run ARGS...       on every worker: tuna-jax ARGS. A tuna-jax subcommand works directly too (`train ...`)
#   copy SRC [DEST]   SRC gs://...: gcloud storage cp -r (no TPU needed); SRC `logs`: every worker's log;
#                     any other SRC: that path on worker 0. DEST defaults to the current folder.
#   delete            gcloud compute tpus tpu-vm delete --quiet
#
# Environment: TPU_NAME and ZONE (every command but copy gs://...); PROJECT; for create ACCELERATOR_TYPE
# (v4-32, v5litepod-16, ...), RUNTIME_VERSION (default from the accelerator: v4 tpu-ubuntu2204-base,
# v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e), SPOT=1 or PREEMPTIBLE=1,
# CREATE_FLAGS (more create flags, split on spaces); for setup REPO_URL, REF (default main), WORKDIR
# (default ~/tuna-jax on the workers).
#
# Every worker runs the same tuna-jax command; jax.distributed.initialize() finds the coordinator
# from the TPU metadata (tuna_jax/parallel.py), each host loads only its slice of every batch, and
# each worker appends its output to ~/tuna-jax-logs/<hostname>.log (`copy logs` fetches them all).
# Data, configs, checkpoints, exports and eval reports may stay in a bucket (gs://...): every worker
# reads and writes them there, so nothing is copied to the workers by hand.
set -euo pipefail

REPO_URL=${REPO_URL:-https://github.com/your-org/tuna-jax.git}
REF=${REF:-main}
WORKDIR=${WORKDIR:-\$HOME/tuna-jax}  # expanded on the worker

usage() {
  echo "usage: $0 create | setup | run ARGS... | <tuna-jax subcommand> ARGS... | copy SRC [DEST] | delete" >&2
  exit 2
}

need_tpu() {
  : "${TPU_NAME:?set TPU_NAME (the name of the TPU VM)}" "${ZONE:?set ZONE (e.g. us-central2-b)}"
  where=(--zone="$ZONE")
  if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
}

ssh_all() {
  need_tpu
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "no default runtime version for ACCELERATOR_TYPE=$1: set RUNTIME_VERSION" >&2; exit 2 ;;
  esac
}

run_tuna() {
  # Quote every argument for the worker's shell; keep tuna-jax's exit status through the tee.
  local args
  args=$(printf ' %q' "$@")
  ssh_all "set -o pipefail; cd $WORKDIR && mkdir -p \$HOME/tuna-jax-logs && \
tuna-jax$args 2>&1 | tee -a \$HOME/tuna-jax-logs/\$(hostname).log"
}

case "${1:-}" in
  create)
    need_tpu
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v4-32 or v5litepod-16)}"
    version=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}
    flags=("${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$version")
    if [ "${SPOT:-0}" = 1 ]; then flags+=(--spot); fi
    if [ "${PREEMPTIBLE:-0}" = 1 ]; then flags+=(--preemptible); fi
    read -r -a extra <<< "${CREATE_FLAGS:-}"
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" ${extra[@]+"${extra[@]}"}
    ;;
  setup)
    repo=$(printf '%q' "$REPO_URL")
    ref=$(printf '%q' "$REF")
    ssh_all "set -e; [ -d $WORKDIR ] || git clone $repo $WORKDIR; cd $WORKDIR && git fetch --quiet origin && \
git checkout --quiet $ref && git pull --ff-only --quiet origin $ref; \
pip install -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
pip install -e '.[gcs]'"
    ;;
  run)
    shift
    [ $# -gt 0 ] || usage
    run_tuna "$@"
    ;;
  copy)
    src=${2:-}
    dest=${3:-.}
    [ -n "$src" ] || usage
    case "$src" in
      gs://*) gcloud storage cp -r "$src" "$dest" ;;
      logs)
        need_tpu
        mkdir -p "$dest"
        gcloud compute tpus tpu-vm scp "$TPU_NAME:tuna-jax-logs" "$dest" "${where[@]}" --worker=all --recurse ;;
      *)
        need_tpu
        gcloud compute tpus tpu-vm scp "$TPU_NAME:$src" "$dest" "${where[@]}" --worker=0 --recurse ;;
    esac
    ;;
  delete)
    need_tpu
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  ""|-h|--help)
    usage
    ;;
  *)
    run_tuna "$@"
    ;;
esac
