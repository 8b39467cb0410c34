#!/usr/bin/env bash
# The accelerator checks of bench/README.md in one call (under 10 minutes on one H100/H200):
#   1. the cuDNN attention parity tests; 2. the ranking step at 8 prompts per step: ours (padded,
#   packed) against the PyTorch reference-style step, same data and weights; 3. the ranking step at
#   48 prompts per step (32 on an 80 GB card), for MFU; 4. the sampler against HF generate.
# JAX and PyTorch share the GPU in parts 2 and 4, so JAX allocates on demand (no preallocation).
# Each part has its own time limit, so one failure still leaves the others' figures.
# Usage: bash bench/gpu_run.sh OUT_DIR     (TUNA_SHARED may point at a copy of ../shared)
set -u
out=${1:-bench-out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
[ -z "${TUNA_SHARED:-}" ] && [ -d shared/data ] && export TUNA_SHARED=$PWD/shared  # a copy of ../shared, if carried
run() {  # run NAME SECONDS CMD...: log to $out/NAME.log, print the tail
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "exit $? after $(date +%T)"
  grep -v -e "^I0000" -e "Warning" "$out/$name.log" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$py -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
run attention 60 env JAX_PLATFORMS=cuda $py -m pytest -q -p no:cacheprovider tests/unit/model/test_attention.py -k "cudnn or padding_rows"
run rank_b8 230 $py bench/rank_step.py --gpu --batch 8 --layouts padded,packed --torch yes --batches 2 --rounds 2 \
    --pad-to-multiple 0 --logits-budget-mb 4096 --json "$out/rank_b8.json"
# 48 prompts per step need about 94 GB (H200); 32 fit an H100's 80 GB. Unrolled layers: the scan's
# temporaries do not fit at these batches.
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
big=$([ "${mib:-0}" -gt 100000 ] && echo 48 || echo 32)
run rank_mfu 150 $py bench/rank_step.py --gpu --batch "$big" --unroll --layouts packed --torch no --batches 3 \
    --rounds 3 --logits-budget-mb 4096 --json "$out/rank_mfu.json"
run generate 100 $py bench/generate.py --gpu
