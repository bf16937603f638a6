#!/usr/bin/env bash
# accelerate launch of framework.train; Accelerate only starts the processes (all logic stays
# in Python, strategy and precision come from the Hydra overrides):
#   launchers/accelerate/launch.sh multi_gpu 8 strategy=fsdp model=gpt2-1.3b precision=bf16
#   launchers/accelerate/launch.sh multi_cpu 2 strategy=fsdp trainer.device=cpu
set -euo pipefail
CONFIG=${1:?usage: launch.sh multi_gpu|multi_cpu NUM_PROCESSES [hydra overrides...]}
NPROC=${2:?usage: launch.sh multi_gpu|multi_cpu NUM_PROCESSES [hydra overrides...]}
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launchers/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # the project's environment (FW_ENV, .venv)
fw_require accelerate
exec accelerate launch --config_file "$HERE/$CONFIG.yaml" --num_processes "$NPROC" \
  --main_process_port "${MASTER_PORT:-29511}" -m framework.train "$@"
