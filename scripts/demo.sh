#!/usr/bin/env bash
# Sets up a fresh machine (packages, build) and trains an MLP on Fashion-MNIST with ShardPS:
# 2 servers and 4 workers on this machine over TCP, compared against the same model trained in
# one process. Extra arguments go to `shardps train` (e.g. --mode async, --epochs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
shardps_install_deps
shardps_build build
mkdir -p out
exec build/bin/shardps train --dataset fashion-mnist --baseline \
  --report out/train-report.json --plot out/train.png "$@"
