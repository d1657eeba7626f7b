#!/usr/bin/env bash
# Installs what ShardPS needs on Debian bookworm (idempotent: only missing packages), then
# configures and builds into ./build. Sourced by test.sh and demo.sh; runnable on its own.
set -euo pipefail

SHARDPS_PACKAGES=(
  cmake ninja-build g++ pkg-config git clang clang-format libclang-rt-14-dev python3
  libgtest-dev libgmock-dev
  libfmt-dev libspdlog-dev libcli11-dev nlohmann-json3-dev libxxhash-dev libssl-dev prometheus-cpp-dev prometheus
  libeigen3-dev zlib1g-dev gnuplot-nox dataset-fashion-mnist
  libucx-dev ucx-utils libibverbs-dev ibverbs-utils librdmacm-dev
  dpkg-dev file openmpi-bin slurmctld slurmd slurm-client munge
  python3-torch python3-numpy python3-dev pybind11-dev python3-pytest
)

shardps_install_deps() {
  local missing=()
  for p in "${SHARDPS_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#SHARDPS_PACKAGES[@]} packages present"
    return 0
  fi
  echo "setup: installing ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      echo "setup: need root or sudo to install: ${missing[*]}" >&2
      return 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  # apt may be briefly locked on a fresh machine; retry a few times (bounded).
  local i
  for i in 1 2 3; do
    if $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
      return 0
    fi
    echo "setup: apt-get failed (attempt $i); retrying in 10 s" >&2
    sleep 10
  done
  return 1
}

shardps_build() {
  local dir="${1:-build}"; shift || true
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$dir" -j "$(nproc)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/.."
  shardps_install_deps
  shardps_build build
fi
