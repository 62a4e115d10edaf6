#!/usr/bin/env bash
# Shared torchrun wrapper for the run_*.sh launchers: node/process layout from the environment.
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500, or any free port on one node)
#   NPROC_PER_NODE (number of GPUs, or 1 without GPUs)
set -euo pipefail
script="$1"; shift
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
if [ "$NNODES" = "1" ] && [ -z "${MASTER_PORT:-}" ]; then
  # one node and no port chosen: let torchrun pick a free one, so parallel runs do not collide
  layout=(--standalone --nproc_per_node "$NPROC_PER_NODE")
else
  layout=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
          --master_port "${MASTER_PORT:-29500}" --nproc_per_node "$NPROC_PER_NODE")
fi
exec torchrun "${layout[@]}" "$script" "$@"
