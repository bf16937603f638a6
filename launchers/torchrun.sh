#!/usr/bin/env bash
# Single- or multi-node torchrun launch of framework.train; all logic stays in Python.
#   launchers/torchrun.sh 8 strategy=fsdp model=gpt2-1.3b precision=bf16
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (launchers/slurm.sbatch does).
# --signals-to-handle forwards SIGTERM/SIGUSR1 to the workers instead of dying and orphaning
# them; --shutdown-timeout gives them time to finish a checkpoint before SIGKILL.
set -euo pipefail
NPROC=${1:?usage: torchrun.sh NPROC_PER_NODE [hydra overrides...]}
shift
# shellcheck source=launchers/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the project's environment (FW_ENV, .venv)
fw_require torchrun
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --signals-to-handle "SIGTERM,SIGINT,SIGUSR1,SIGUSR2" \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}" \
  -m framework.train "$@"
