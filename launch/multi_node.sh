#!/usr/bin/env bash
# M nodes × N GPUs through the DeepSpeed launcher (pdsh over passwordless ssh), started on one node.
#
#   HOSTFILE=launch/hostfile ZERO=3 bash launch/multi_node.sh CONFIG [--set key=value ...]
#
# Needs: the same repository path and Python environment on every node, a shared filesystem for
# data/ and out_dir (checkpoints are written by every rank), pdsh + passwordless ssh between nodes.
# Environment:
#   HOSTFILE     "host slots=N" lines (default launch/hostfile; see launch/hostfile.example)
#   ZERO, BF16, DS_CONFIG   as in launch/multi_gpu.sh
#   MASTER_ADDR  address of the first host, reachable from all nodes (default: first host in HOSTFILE)
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500)
#   LAUNCHER     DeepSpeed multi-node backend: pdsh (default), openmpi, mvapich, slurm
# Run from the repository root. See docs/distributed.md.
set -euo pipefail
config=${1:?usage: launch/multi_node.sh CONFIG [--set key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE (copy launch/hostfile.example)" >&2; exit 2; }
suffix=""; dtype=()
if [ "${BF16:-0}" = 1 ]; then suffix="-bf16"; dtype=(--set train.dtype=bfloat16); fi
if [ "${BF16:-0}" = autocast ]; then suffix="-bf16-autocast"; dtype=(--set train.dtype=bfloat16); fi
DS_CONFIG=${DS_CONFIG:-configs/ds/zero${ZERO:-2}${suffix}.json}
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
exec deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module tsvd.cli train "$config" \
    --set engine.kind=deepspeed --set "engine.deepspeed_config=$DS_CONFIG" "${dtype[@]}" "$@"
