#!/usr/bin/env bash
# One process, no launcher: plain PyTorch engine (or DeepSpeed with world size 1 when DS_CONFIG is set).
#
#   bash launch/single.sh CONFIG [--set key=value ...]
#   DS_CONFIG=configs/ds/zero0.json bash launch/single.sh CONFIG      # same run through DeepSpeed
#
# Environment: DS_CONFIG (optional DeepSpeed JSON), PYTHON (default python).
# Run from the repository root. See docs/distributed.md.
set -euo pipefail
config=${1:?usage: launch/single.sh CONFIG [--set key=value ...]}
shift
args=()
if [ -n "${DS_CONFIG:-}" ]; then
    args=(--set engine.kind=deepspeed --set "engine.deepspeed_config=$DS_CONFIG")
fi
exec "${PYTHON:-python}" -m tsvd.cli train "$config" "${args[@]}" "$@"
