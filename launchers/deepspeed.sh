#!/usr/bin/env bash
# DeepSpeed launcher for the ZeRO strategies:
#   launchers/deepspeed.sh 8 strategy=zero2 model=gpt2-1.3b precision=bf16
# --no_local_rank: the deepspeed launcher otherwise appends --local_rank=N, which a Hydra app
# rejects; our ranks come from the environment it sets (RANK, LOCAL_RANK, WORLD_SIZE).
# Environment:
#   MASTER_PORT   rendezvous port (default 29500); MASTER_ADDR the first node's address
#   HOSTFILE      a DeepSpeed hostfile (`host slots=N` lines) for several nodes
#   NODE_RANK     this node's index in HOSTFILE: launch once per node without ssh
#                 (--no_ssh), e.g. from srun or a cluster's own per-node launcher
set -euo pipefail
NGPUS=${1:?usage: deepspeed.sh NUM_GPUS_PER_NODE [hydra overrides...]}
shift
# shellcheck source=launchers/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the project's environment (FW_ENV, .venv)
fw_require deepspeed
DS=(--num_gpus "$NGPUS" --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  DS+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?HOSTFILE needs MASTER_ADDR (the first node)}")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  DS+=(--master_addr "$MASTER_ADDR")
fi
if [[ -n "${NODE_RANK:-}" ]]; then
  DS+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed "${DS[@]}" --module framework.train "$@"
