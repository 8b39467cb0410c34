#!/usr/bin/env bash
# Several GPU hosts without SLURM: run this on every host with the same coordinator.
#
#   COORD=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 ./launch/gpu_local.sh train configs/tuna_p.yaml
#   COORD=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=1 ./launch/gpu_local.sh train configs/tuna_p.yaml
#
# One host alone needs none of this: `tuna-jax train ...` uses every local GPU.
set -euo pipefail
: "${COORD:?set COORD=host:port of host 0}" "${NUM_HOSTS:?}" "${HOST_ID:?}"
export JAX_COORDINATOR_ADDRESS=$COORD JAX_NUM_PROCESSES=$NUM_HOSTS JAX_PROCESS_ID=$HOST_ID
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec tuna-jax "$@"
