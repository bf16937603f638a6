#!/usr/bin/env bash
# `make docker-test`: build docker/Dockerfile and train inside the image, on a machine without a
# Docker engine or a registry (buildah, DESIGN "install facts"):
#   1. a Debian bookworm base made locally (debootstrap, cached under $FW_DOCKER_WORK),
#   2. the image built from docker/Dockerfile with that base as BASE; pip reaches its index with
#      the host's CA bundle, and this machine's local wheel folders (the CPU torch) mounted,
#   3. inside the image: `id -u` must not be 0, then launchers/torchrun.sh trains the debug model
#      with strategy=zero2 on 2 processes into a host directory owned by uid 1000 (the README's
#      `chown 1000` recipe), and metrics.jsonl must hold 3 steps.
# Needs root (buildah with --isolation chroot); installs buildah and debootstrap when missing.
# Environment: FW_DOCKER_WORK (cache and scratch, default /var/tmp/fw-docker-test),
# FW_DOCKER_TORCH (default torch==2.13.0), FW_DOCKER_KEEP=1 keeps the built image,
# DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${FW_DOCKER_WORK:-/var/tmp/fw-docker-test}
image=localhost/framework-test:latest
base=localhost/framework-test-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
t_start=$SECONDS

say() { printf '[docker-test %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }
die() { printf 'docker-test: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (buildah --isolation chroot and debootstrap); run it as root, e.g. sudo make docker-test"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing buildah and debootstrap (apt-get)"
  apt-get install -y -q buildah debootstrap >/dev/null \
    || die "apt-get install buildah debootstrap failed: install them, then rerun"
fi

mkdir -p "$work"
# Own storage (vfs: no overlay mounts needed) so the test neither needs nor disturbs the
# machine's default container storage.
bh() { buildah --root "$work/storage" --runroot "$work/runroot" --storage-driver vfs "$@"; }

# 1. The base: a minimal Debian rootfs as a local image (no registry to pull one from).
if ! bh inspect --type image "$base" >/dev/null 2>&1; then
  say "making the base image with debootstrap ($mirror)"
  rm -rf "$work/rootfs" "$work/base"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $work/debootstrap.log"
  mkdir -p "$work/base"
  tar -C "$work/rootfs" -cf "$work/base/rootfs.tar" .
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$work/base/Containerfile"
  bh bud --quiet --isolation chroot -f "$work/base/Containerfile" -t "$base" "$work/base" >/dev/null
  rm -rf "$work/rootfs" "$work/base"
fi
say "base image $base ready"

# 2. Build options for this machine only, passed as build args and read-only mounts so the
# Dockerfile stays a plain `docker build` file. The CA bundle goes in a folder of its own,
# mounted away from /etc/ssl/certs (the image apt-installs ca-certificates, which writes there).
mkdir -p "$work/ca"
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$work/ca/ca.crt"
mounts=(-v "$work/ca:/opt/host-ca:ro")
pip_extra="--cert /opt/host-ca/ca.crt"
# This machine's local wheel folders and simple indexes (the CPU torch wheel lives there;
# without them pip downloads the CUDA build): whatever the host's pip is configured with.
host_pip=$(command -v pip3 || command -v pip || true)
if [[ -n $host_pip ]]; then
  while read -r key value; do
    for loc in $value; do
      path=${loc#file://}
      [[ -d $path ]] || continue
      # mount the index's parent too: a simple index links to ../files next to it
      [[ $key == find-links ]] && mounts+=(-v "$path:$path:ro") || mounts+=(-v "$(dirname "$path"):$(dirname "$path"):ro")
      pip_extra+=" --$key $loc"
    done
  done < <("$host_pip" config list 2>/dev/null \
    | sed -nE "s/^global\.(find-links|extra-index-url)='(.*)'$/\1 \2/p")
fi

say "building $image from docker/Dockerfile (pip options: $pip_extra)"
t_build=$SECONDS
bh bud --isolation chroot --layers=false -f "$repo/docker/Dockerfile" \
  --build-arg BASE="$base" \
  --build-arg TORCH="${FW_DOCKER_TORCH:-torch==2.13.0}" \
  --build-arg PIP_EXTRA="$pip_extra" \
  "${mounts[@]}" -t "$image" "$repo" >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; die "image build failed, full log: $work/build.log"; }
say "image built in $((SECONDS - t_build)) s (log: $work/build.log)"

# 3. Run it: a working container of the image (its USER, WORKDIR and ENV apply).
ctr=$(bh from --quiet "$image")
cleanup() {
  local t=$SECONDS
  bh rm "$ctr" >/dev/null 2>&1 || true
  if [[ ${FW_DOCKER_KEEP:-0} != 1 ]]; then bh rmi "$image" >/dev/null 2>&1 || true; fi
  say "removed the working container and image in $((SECONDS - t)) s"
}
trap cleanup EXIT

uid=$(bh run --isolation chroot "$ctr" -- id -u)
[[ $uid =~ ^[0-9]+$ && $uid != 0 ]] || die "the image runs as uid '$uid': it must not be root (Dockerfile USER)"
if bh run --isolation chroot "$ctr" -- sh -c 'command -v sudo' >/dev/null 2>&1; then
  die "sudo is installed in the image: a non-root user must not be able to become root"
fi
say "image runs as uid $uid, no sudo"
# The README's other recipe, `--user $(id -u):$(id -g) -e HOME=/tmp`: an arbitrary uid must be
# able to write DeepSpeed's JIT cache and the data root.
bh run --isolation chroot --user 4242:4242 --env HOME=/tmp "$ctr" -- \
  sh -c 'touch "$TORCH_EXTENSIONS_DIR/.probe" /workspace/data/.probe && rm "$TORCH_EXTENSIONS_DIR/.probe" /workspace/data/.probe' \
  || die "uid 4242 cannot write TORCH_EXTENSIONS_DIR or /workspace/data: the README's --user recipe would fail"
say "an arbitrary uid (--user 4242) can write the JIT cache and the data root"

# The README's host-directory recipe: a host runs dir owned by uid 1000, mounted at runs/.
runs="$work/runs"
rm -rf "$runs" && mkdir -p "$runs" && chown 1000:1000 "$runs"
# chroot isolation shares the host's network: a free port, not torchrun's 29500 that a test on
# this machine may hold.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "training zero2 on 2 processes inside the image (master port $port)"
t_train=$SECONDS
bh run --isolation chroot -v "$runs:/workspace/framework/runs" \
  --env MASTER_PORT="$port" --env OMP_NUM_THREADS=1 "$ctr" -- \
  launchers/torchrun.sh 2 strategy=zero2 run.dir=runs/zero2 \
  model.n_layer=2 model.n_embd=64 trainer.max_steps=3 trainer.seq_len=32 \
  trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.eval_every=0 trainer.log_every=1 trainer.device=cpu \
  >"$work/train.log" 2>&1 \
  || { tail -n 40 "$work/train.log" >&2; die "training inside the image failed, full log: $work/train.log"; }
say "trained in $((SECONDS - t_train)) s (log: $work/train.log)"

python3 - "$runs/zero2/metrics.jsonl" <<'EOF'
import json
import sys

path = sys.argv[1]
try:
    rows = [json.loads(line) for line in open(path) if line.strip()]
except FileNotFoundError:
    sys.exit(f"docker-test: {path} was not written: the run inside the image did not log")
steps = sorted({r["step"] for r in rows if "loss" in r})
if steps != [1, 2, 3]:
    sys.exit(f"docker-test: {path} has train steps {steps}, expected [1, 2, 3]")
print(f"docker-test: metrics ok, train steps {steps}, last loss {[r for r in rows if 'loss' in r][-1]['loss']:.4f}")
EOF
say "PASS: built and trained zero2 x2 as uid $uid in $((SECONDS - t_start)) s"
