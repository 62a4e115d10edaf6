#!/usr/bin/env bash
# The whole chain: PT -> SFT -> RM -> PPO, and DPO from the SFT model; each LoRA output is merged into the
# model its stage started from, and that is the next stage's start. Ends with a before -> after report
# (OUTPUT_ROOT/report.md, report.json, losses.png).
#   bash run_pipeline.sh                                  # embedded default: configs/pipeline_default.yaml
#   bash run_pipeline.sh configs/pipeline_example.yaml    # or CONFIG=... bash run_pipeline.sh
#   OUTPUT_ROOT=/tmp/run NPROC_PER_NODE=8 bash run_pipeline.sh my_run.yaml
# Re-running skips the stages that finished and resumes an interrupted one from its last checkpoint.
# Every stage's flags are parsed by that stage's own parser before the first stage starts. SIGTERM, SIGINT or
# SIGHUP stops the running stage (it saves a checkpoint) and then this script, with 128 + the signal (143).
# NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT / NPROC_PER_NODE reach every launcher (see run_pt.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$(realpath "${1:-${CONFIG:-$here/configs/pipeline_default.yaml}}")"
cd "$here"

# The config as shell variables: output_root base_model template exact_match_data stages, and per stage
# <stage>_args: template, data folders, method and its extra flags (which come last and win).
settings="$(python -m pipeline.tools.pipeline_config "$config")"
eval "$settings"
OUTPUT_ROOT="${OUTPUT_ROOT:-$output_root}"
DONE=pipeline_stage_done   # written into a stage's folder once its launcher (and merge) succeeded
echo "== config $config -> $OUTPUT_ROOT"
# each stage's flags through its own parser now, so a mistake in a late stage costs no training
python -m pipeline.tools.pipeline_config --check-flags "$config"

wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

# Children run in the background and are waited for, so a signal to this shell is handled at once (bash runs
# a trap only once a foreground child has exited): it goes on to the running child as SIGTERM, which stops a
# stage at the end of its step with a checkpoint; then this shell exits 128 + signal.
child=""
run_child() {
  "$@" &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=""
  return "$status"
}
stop() {
  trap '' TERM INT HUP
  if [ -n "$child" ]; then
    echo "== $1: stopping pid $child (a stage saves a checkpoint first)" >&2
    kill -TERM "$child" 2>/dev/null || true
    while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
  fi
  exit "$2"
}
trap 'stop SIGTERM 143' TERM
trap 'stop SIGINT 130' INT
trap 'stop SIGHUP 129' HUP

# run_stage NAME LAUNCHER START [FLAGS...]: stage NAME trains from model START into $OUTPUT_ROOT/NAME; an
# adapter is then merged into START (-> NAME-merged). Sets $result to the model the next stage starts from.
run_stage() {
  local name="$1" launcher="$2" start="$3"; shift 3
  local out="$OUTPUT_ROOT/$name"
  if [ -f "$out/$DONE" ]; then
    echo "== $name: finished earlier, skipped ($out)"
  else
    echo "== $name from $start -> $out"
    # auto: resume from the last checkpoint-* in $out if there is one (an interrupted run), else start
    run_child bash "$launcher" --model_name_or_path "$start" --output_dir "$out" --resume_from_checkpoint auto "$@"
    echo "$start" > "$out/$DONE"
  fi
  result="$out"
  if [ -f "$out/adapter_config.json" ]; then
    result="$out-merged"
    # a merge appears whole (merge.py renames it into place); one older than the training is redone
    if [ "$result/config.json" -nt "$out/$DONE" ]; then
      echo "== $name-merged: merged earlier, skipped"
    else
      echo "== merging the $name adapter into $start -> $result"
      run_child python merge_peft_adapter.py --base_model "$start" --lora_model "$out" --output_dir "$result"
    fi
  fi
}

# exact_match STAGE BEFORE AFTER: greedy held-out exact match of the models a stage started from and made
# (-> STAGE/exact_match_results.json, which the report reads); measured once per finished stage.
exact_match() {
  local stage="$1" before_model="$2" after_model="$3"
  local em="$OUTPUT_ROOT/$stage/exact_match_results.json"
  if [ -z "$exact_match_data" ] || [ "$em" -nt "$OUTPUT_ROOT/$stage/$DONE" ]; then
    echo "== $stage exact match: ${exact_match_data:+measured earlier, }skipped"
    return
  fi
  echo "== held-out exact match (greedy) of the $stage start and result on $exact_match_data -> $em"
  # the start may have no chat template yet: render with the pipeline's template (auto: the model's own)
  local template_arg=()
  if [ "$template" != auto ]; then template_arg=("$template"); fi
  local before after
  before="$(python -m pipeline.evaluate "$before_model" "$exact_match_data" "${template_arg[@]}")"
  after="$(python -m pipeline.evaluate "$after_model" "$exact_match_data")"
  printf '{"eval_exact_match_before": %s, "eval_exact_match": %s}\n' "$before" "$after" > "$em.partial"
  mv "$em.partial" "$em"
}

model="$base_model"
if [ -z "$model" ]; then
  model="$OUTPUT_ROOT/tiny-llama"
  if [ ! -f "$model/config.json" ]; then
    echo "== building the embedded tiny model -> $model"
    rm -rf "$model.partial"
    run_child python -m pipeline.tiny_model --output_dir "$model.partial"
    mv -T "$model.partial" "$model"   # renamed when complete, so an interrupted build is redone
  fi
fi

# Each stage's <stage>_args carries --eval_on_start True: the evaluation at step 0 is the report's "before" column.
if wants pt; then
  run_stage pt run_pt.sh "$model" "${pt_args[@]}"
  model="$result"
fi

if wants sft; then
  run_stage sft run_sft.sh "$model" "${sft_args[@]}"
  exact_match sft "$model" "$result"
  model="$result"
fi
sft_model="$model"

if wants rm; then
  run_stage rm run_rm.sh "$sft_model" "${rm_args[@]}"
  rm_model="$result"
fi

if wants ppo; then  # from the SFT model, scored by the reward model (its value model starts from it too)
  run_stage ppo run_ppo.sh "$sft_model" --reward_model_name_or_path "$rm_model" "${ppo_args[@]}"
fi

if wants dpo; then
  run_stage dpo run_dpo.sh "$sft_model" "${dpo_args[@]}"
  exact_match dpo "$sft_model" "$result"
fi

python -m pipeline.report "$OUTPUT_ROOT"
