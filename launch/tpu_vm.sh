#!/usr/bin/env bash
# Run a tuna-jax command on every worker of a Cloud TPU VM slice (multi-host).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b ./launch/tpu_vm.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b ./launch/tpu_vm.sh train configs/tuna_p.yaml train.mesh=1,-1,1
#
# Every host runs the same command; jax.distributed.initialize() finds the coordinator from the
# TPU metadata (tuna_jax/parallel.py), and each host loads only its slice of every batch.
# Checkpoints and data must be on storage every host sees (a gs:// bucket works for Orbax;
# data files are read by every host, so copy them to each worker or use a mounted disk).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_URL=${REPO_URL:-https://github.com/your-org/tuna-jax.git}
WORKDIR=${WORKDIR:-\$HOME/tuna-jax}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  setup)
    ssh_all "set -e; [ -d $WORKDIR ] || git clone $REPO_URL $WORKDIR; cd $WORKDIR && git pull --ff-only; \
             pip install -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
             pip install -e ."
    ;;
  "")
    echo "usage: $0 setup | <tuna-jax subcommand and arguments>" >&2; exit 2
    ;;
  *)
    # Quote every argument for the remote shell.
    args=$(printf ' %q' "$@")
    ssh_all "cd $WORKDIR && TUNA_JAX_LOG_HOST=1 tuna-jax$args 2>&1 | tee -a \$HOME/tuna-jax-\$(hostname).log"
    ;;
esac
