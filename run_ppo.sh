#!/usr/bin/env bash
# Stage 4a, PPO (or GRPO/RLOO with --algorithm), under torchrun. All arguments pass through to stages/ppo.py.
#   single GPU / CPU:   bash run_ppo.sh --model_name_or_path SFT --reward_model_name_or_path RM --template_name qwen --train_file_dir data/sft --output_dir outputs/ppo
#   8 GPUs:             NPROC_PER_NODE=8 bash run_ppo.sh ...
#   2 nodes x 8 GPUs:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash run_ppo.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/scripts/torchrun.sh" "$here/stages/ppo.py" "$@"
