#!/usr/bin/env bash
# Stage 4, GRPO or RLOO (trl, no value model), under torchrun. All arguments pass through to stages/grpo.py.
#   single GPU / CPU:   bash run_grpo.sh --algorithm grpo --model_name_or_path M --reward_funcs exact_match --template_name qwen --train_file_dir data/sft --output_dir outputs/grpo --max_steps 100
#   8 GPUs:             NPROC_PER_NODE=8 bash run_grpo.sh ... --deepspeed deepspeed_configs/zero2.json
#   2 nodes x 8 GPUs:   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash run_grpo.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/scripts/torchrun.sh" "$here/stages/grpo.py" "$@"
