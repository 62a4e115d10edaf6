#!/usr/bin/env bash
# Stage 1, PT (continued pretraining), under torchrun. All arguments pass through to stages/pt.py.
#   single GPU / CPU:   bash run_pt.sh --model_name_or_path M --train_file_dir data/pt --output_dir outputs/pt
#   8 GPUs:             NPROC_PER_NODE=8 bash run_pt.sh ... --deepspeed deepspeed_configs/zero2.json
#   2 nodes x 8 GPUs:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash run_pt.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/scripts/torchrun.sh" "$here/stages/pt.py" "$@"
