#!/usr/bin/env bash
# Stage 4b, DPO (direct preference optimization), under torchrun. All arguments pass through to stages/dpo.py.
#   single GPU / CPU:   bash run_dpo.sh --model_name_or_path M --template_name qwen --train_file_dir data/reward --output_dir outputs/dpo
#   8 GPUs:             NPROC_PER_NODE=8 bash run_dpo.sh ... --deepspeed deepspeed_configs/zero2.json
#   2 nodes x 8 GPUs:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash run_dpo.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/scripts/torchrun.sh" "$here/stages/dpo.py" "$@"
