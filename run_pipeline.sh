#!/usr/bin/env bash
# The chain on the embedded default: build the tiny model, PT (LoRA) on the shipped text, merge,
# SFT (LoRA) on the learnable task, merge, then RM (LoRA, merged) and the DPO branch from the SFT model.
# PPO joins after RM when it lands.
#   bash run_pipeline.sh                       # outputs under outputs/demo
#   OUTPUT_ROOT=/tmp/run bash run_pipeline.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
OUTPUT_ROOT="${OUTPUT_ROOT:-outputs/demo}"
base="$OUTPUT_ROOT/tiny-llama"

echo "== building the embedded tiny model -> $base"
[ -f "$base/config.json" ] || python -m pipeline.tiny_model --output_dir "$base"

echo "== PT (LoRA; embeddings and head trained in full) -> $OUTPUT_ROOT/pt"
bash run_pt.sh \
  --model_name_or_path "$base" \
  --train_file_dir data/pt --validation_file_dir data/pt_eval \
  --output_dir "$OUTPUT_ROOT/pt" \
  --use_peft True --lora_rank 16 --lora_alpha 32 --lora_dropout 0 --modules_to_save embed_tokens,lm_head \
  --block_size 128 --per_device_train_batch_size 8 --learning_rate 5e-3 --max_steps 80 \
  --logging_steps 10 --eval_strategy steps --eval_steps 20 --eval_on_start True --save_steps 40 --seed 42

echo "== merging the PT adapter -> $OUTPUT_ROOT/pt-merged"
python merge_peft_adapter.py --base_model "$base" --tokenizer_path "$base" \
  --lora_model "$OUTPUT_ROOT/pt" --output_dir "$OUTPUT_ROOT/pt-merged"

echo "== SFT (LoRA, qwen template) -> $OUTPUT_ROOT/sft"
bash run_sft.sh \
  --model_name_or_path "$OUTPUT_ROOT/pt-merged" --template_name qwen \
  --train_file_dir data/sft --validation_file_dir data/sft_eval \
  --output_dir "$OUTPUT_ROOT/sft" --model_max_length 128 \
  --use_peft True --lora_rank 16 --lora_alpha 32 --lora_dropout 0 --modules_to_save embed_tokens,lm_head \
  --per_device_train_batch_size 16 --learning_rate 5e-3 --max_steps 120 --logging_steps 20 --save_steps 60 --seed 42

echo "== merging the SFT adapter -> $OUTPUT_ROOT/sft-merged"
python merge_peft_adapter.py --base_model "$OUTPUT_ROOT/pt-merged" \
  --lora_model "$OUTPUT_ROOT/sft" --output_dir "$OUTPUT_ROOT/sft-merged"

echo "== held-out exact match on the learnable task (greedy, through the chat template)"
em_before=$(python -m pipeline.evaluate "$OUTPUT_ROOT/pt-merged" data/sft_eval qwen)
em_after=$(python -m pipeline.evaluate "$OUTPUT_ROOT/sft-merged" data/sft_eval)
echo "SFT exact match: $em_before before -> $em_after after (saved tokenizer's own chat template)"

echo "== RM (LoRA; score head trained) -> $OUTPUT_ROOT/rm, merged -> $OUTPUT_ROOT/rm-merged"
bash run_rm.sh \
  --model_name_or_path "$OUTPUT_ROOT/sft-merged" --template_name qwen \
  --train_file_dir data/reward --validation_file_dir data/reward_eval \
  --output_dir "$OUTPUT_ROOT/rm" --model_max_length 128 \
  --use_peft True --lora_rank 16 --lora_alpha 32 --lora_dropout 0 \
  --per_device_train_batch_size 16 --learning_rate 2e-3 --max_steps 200 --logging_steps 50 --save_steps 100 --seed 42
python merge_peft_adapter.py --base_model "$OUTPUT_ROOT/sft-merged" \
  --lora_model "$OUTPUT_ROOT/rm" --output_dir "$OUTPUT_ROOT/rm-merged"

echo "== DPO (full, from the SFT model) -> $OUTPUT_ROOT/dpo"
bash run_dpo.sh \
  --model_name_or_path "$OUTPUT_ROOT/sft-merged" --template_name qwen \
  --train_file_dir data/reward --validation_file_dir data/reward_eval \
  --output_dir "$OUTPUT_ROOT/dpo" --model_max_length 128 --use_peft False --beta 0.1 \
  --per_device_train_batch_size 16 --learning_rate 1e-4 --max_steps 40 --logging_steps 10 --save_steps 40 --seed 42

python - "$OUTPUT_ROOT" <<'PY'
import json, sys
root = sys.argv[1]
state = json.load(open(f"{root}/pt/trainer_state.json"))
evals = [h for h in state["log_history"] if "eval_loss" in h]
final = json.load(open(f"{root}/pt/eval_results.json"))
print(f"PT eval perplexity: {__import__('math').exp(evals[0]['eval_loss']):.1f} before training"
      f" -> {final['perplexity']:.1f} at the end; merged model in {root}/pt-merged")
rm = json.load(open(f"{root}/rm/eval_results.json"))
print(f"RM held-out pairwise accuracy {rm['eval_accuracy']:.3f}, mean margin {rm['eval_margin']:.2f}")
dpo = json.load(open(f"{root}/dpo/eval_results.json"))
print(f"DPO held-out: chosen beats rejected vs the reference on {dpo['eval_rewards/accuracies']:.3f} of pairs,"
      f" mean reward margin {dpo['eval_rewards/margins']:.3f}")
PY
