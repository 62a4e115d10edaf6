#!/usr/bin/env bash
# Stage 3, RM (reward model), under torchrun. All arguments pass through to stages/rm.py.
#   single GPU / CPU:   bash run_rm.sh --model_name_or_path M --template_name qwen --train_file_dir data/reward --output_dir outputs/rm
#   8 GPUs:             NPROC_PER_NODE=8 bash run_rm.sh ... --deepspeed deepspeed_configs/zero2.json
#   2 nodes x 8 GPUs:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash run_rm.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/scripts/torchrun.sh" "$here/stages/rm.py" "$@"
