#!/usr/bin/env bash
# The GPU checks in one call: the `gpu` test tier, then the throughput benchmark.
#
#   bench/run_gpu.sh prepare     # here, where pip reaches a registry: fill .whl/ (git-ignored)
#   bench/run_gpu.sh             # on the CUDA machine, from the repository root
#
# The H100/H200 machines have Python 3.12 and torch (CUDA), pyarrow, accelerate, transformers,
# but no hydra-core, omegaconf, antlr4 runtime, deepspeed or wandb, and no network (DESIGN.md
# "GPU runs"): `prepare` downloads or builds those wheels into .whl/, and the run installs them
# into a private target folder (the machine's own environment is left alone). wandb is not
# carried: only logger=wandb imports it, and nothing here uses it.
#
# Logs go to $OUT when it is set (else /tmp/fw-gpu-results/): gpu_tests.log, throughput.jsonl,
# env.txt. Extra benchmark flags: BENCH_ARGS="--compile --steps 50" bench/run_gpu.sh
# Exit status: non-zero if the tests or the benchmark failed (both always run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=.whl

if [ "${1:-}" = "prepare" ]; then
    set -e
    mkdir -p "$WHEELS"
    # Versions as in this project's CPU venv; --python-version 3.12 for the GPU machines.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 hjson==3.1.0
    # Source-only on PyPI: build pure-Python wheels (deepspeed JIT-builds its ops on the GPU).
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
    ls -1 "$WHEELS"
    exit 0
fi

LOGS=${OUT:-/tmp/fw-gpu-results}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fw-site "$WHEELS"/*.whl || { echo "wheel install failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/fw-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no $WHEELS/*.whl: expecting hydra-core and omegaconf to be installed already" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
    git rev-parse HEAD 2>/dev/null
} | tee "$LOGS/env.txt"

"$PY" -m pytest -m gpu tests/gpu -q -rs -s -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$PY" bench/throughput.py ${BENCH_ARGS:-} 2> >(tee "$LOGS/throughput.stderr.log" >&2) | tee "$LOGS/throughput.jsonl"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests: exit $tests_rc; throughput: exit $bench_rc" | tee -a "$LOGS/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
