#!/usr/bin/env bash
# Shared torchrun wrapper for the run_*.sh launchers: node/process layout from the environment.
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500, or any free port on one node)
#   NPROC_PER_NODE (number of GPUs, or 1 without GPUs)
# torchrun runs as pipeline/run/launch.py (the same agent): it dies with this shell, its workers die with it,
# and a failed stage ends with the stage's own exit code (2: a user error, 143: stopped by SIGTERM).
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
# Not exec'd: this shell stays the launcher's parent, whose death (even by SIGKILL) the launcher watches; so
# `nohup bash run_sft.sh &` still outlives a logout, and a kill of this shell still ends the stage. In the
# background with `wait`, so a SIGTERM, SIGINT or SIGHUP of this shell reaches the launcher at once (as a
# SIGTERM: save a checkpoint and stop) and the shell still ends with the launcher's exit code.
PIPELINE_PARENT_PID=$$ python -m pipeline.run.launch "${layout[@]}" "$script" "$@" &
launcher=$!
trap 'kill -TERM "$launcher" 2>/dev/null || true' TERM INT HUP
while true; do
  status=0
  wait "$launcher" || status=$?
  # a trapped signal makes `wait` return early (status > 128) while the launcher is still stopping
  [ -n "$(jobs -pr)" ] || break
done
exit "$status"
