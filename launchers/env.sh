# Sourced by the launch scripts: put the project's Python environment on PATH, so `torchrun`,
# `deepspeed` and `accelerate` are found without activating anything by hand. In this order:
#   1. FW_ENV=<script>: sourced as is (e.g. `source /opt/venv/bin/activate`, a conda activate
#      or `module load` line); set it when the environment lives outside the repository.
#   2. no virtualenv active (VIRTUAL_ENV unset): the repository's .venv (what `make install`
#      creates), when it exists.
#   3. otherwise PATH as it is (an activated venv, a container's /opt/venv).
_fw_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${FW_ENV:-}" ]]; then
  if [[ ! -f "$FW_ENV" ]]; then
    echo "FW_ENV=$FW_ENV is not a file: set it to a script that puts torchrun on PATH (e.g. a venv's bin/activate), or unset it" >&2
    exit 2
  fi
  set +u  # activate scripts read unset variables
  # shellcheck disable=SC1090
  source "$FW_ENV"
  set -u
elif [[ -z "${VIRTUAL_ENV:-}" && -x "$_fw_root/.venv/bin/python" ]]; then
  export VIRTUAL_ENV="$_fw_root/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
fi

# fw_require CMD: fail with what to do when the launcher command is not on PATH.
fw_require() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "$1: not found on PATH. Run 'make install' (creates $_fw_root/.venv, used when no venv is active), activate the project's environment, or set FW_ENV to a script that does" >&2
    exit 127
  fi
}
