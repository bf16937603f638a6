#!/usr/bin/env bash
# Single- or multi-node torchrun launch of framework.train; all logic stays in Python.
#   launchers/torchrun.sh 8 strategy=fsdp model=gpt2-1.3b precision=bf16
# Multi-node: set NNODES (> 1), MASTER_ADDR and MASTER_PORT of the first node (the c10d
# rendezvous host) and an RDZV_ID shared by the job's agents (launchers/slurm/train.sbatch does).
# --signals-to-handle forwards SIGTERM/SIGUSR1 to the workers instead of dying and orphaning
# them; --shutdown-timeout gives them time to finish a checkpoint before SIGKILL.
set -euo pipefail
NPROC=${1:?usage: torchrun.sh NPROC_PER_NODE [hydra overrides...]}
shift
# shellcheck source=launchers/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the project's environment (FW_ENV, .venv)
fw_require torchrun
if [[ "${NNODES:-1}" -gt 1 ]]; then  # c10d: the agents meet at MASTER_ADDR:MASTER_PORT, ranks assigned there
  RDZV=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-framework}"
        --rdzv_endpoint "${MASTER_ADDR:?multi-node needs MASTER_ADDR}:${MASTER_PORT:-29500}")
else
  RDZV=(--nnodes 1 --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
exec torchrun "${RDZV[@]}" \
  --nproc_per_node "$NPROC" \
  --signals-to-handle "SIGTERM,SIGINT,SIGUSR1,SIGUSR2" \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}" \
  -m framework.train "$@"
