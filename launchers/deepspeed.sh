#!/usr/bin/env bash
# DeepSpeed launcher for the ZeRO strategies:
#   launchers/deepspeed.sh 8 strategy=zero2 model=gpt2-1.3b precision=bf16
# --no_local_rank: the deepspeed launcher otherwise appends --local_rank=N, which a Hydra app
# rejects; our ranks come from the environment it sets (RANK, LOCAL_RANK, WORLD_SIZE).
set -euo pipefail
NGPUS=${1:?usage: deepspeed.sh NUM_GPUS [hydra overrides...]}
shift
# shellcheck source=launchers/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the project's environment (FW_ENV, .venv)
fw_require deepspeed
exec deepspeed --num_gpus "$NGPUS" --no_local_rank --module framework.train "$@"
