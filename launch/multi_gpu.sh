#!/usr/bin/env bash
# One node, N processes through the DeepSpeed launcher (N GPUs, or N CPU processes with DS_ACCELERATOR=cpu).
#
#   NUM_GPUS=8 ZERO=2 bash launch/multi_gpu.sh CONFIG [--set key=value ...]
#   DS_ACCELERATOR=cpu NUM_GPUS=2 bash launch/multi_gpu.sh CONFIG          # two CPU processes (gloo)
#
# Environment:
#   NUM_GPUS     processes on this node (default: all visible GPUs, else 2)
#   ZERO         ZeRO stage 0–3 (default 2), picks configs/ds/zero$ZERO.json (…-bf16.json with BF16=1)
#   DS_CONFIG    a DeepSpeed JSON instead of ZERO/BF16
#   BF16=1       DeepSpeed's native bf16: bf16 parameters, fp32 masters (also sets train.dtype=bfloat16)
#   BF16=autocast  bf16 torch autocast over fp32 parameters (…-bf16-autocast.json, train.dtype=bfloat16)
#   MASTER_PORT  rendezvous port (default: a free one)
# Run from the repository root. See docs/distributed.md.
set -euo pipefail
config=${1:?usage: launch/multi_gpu.sh CONFIG [--set key=value ...]}
shift
PYTHON=${PYTHON:-python}
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
suffix=""; dtype=()
if [ "${BF16:-0}" = 1 ]; then suffix="-bf16"; dtype=(--set train.dtype=bfloat16); fi
if [ "${BF16:-0}" = autocast ]; then suffix="-bf16-autocast"; dtype=(--set train.dtype=bfloat16); fi
DS_CONFIG=${DS_CONFIG:-configs/ds/zero${ZERO:-2}${suffix}.json}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "from tsvd.distributed import free_port; print(free_port())")}
# Threads per rank are set by the engine (cores / local ranks); this covers work done at import time.
cores=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NUM_GPUS > 0 ? cores / NUM_GPUS : 1 ))}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank \
    --module tsvd.cli train "$config" \
    --set engine.kind=deepspeed --set "engine.deepspeed_config=$DS_CONFIG" "${dtype[@]}" "$@"
