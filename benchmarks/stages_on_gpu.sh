#!/usr/bin/env bash
# Runs a planned DAG's stage commands in dependency order on a GPU machine without Snakemake (the lent test GPUs),
# then loads the card's model with plain transformers. Plan on a machine with lmforge installed; this writes every stage's
# resolved config under <results>/configs:
#
#   lmforge config finetune=qlora resources.finetune.gpus=1 run.results_dir=.qs/results --write-stage-configs
#
# then, with lmforge's dependencies importable on the GPU machine:   bash benchmarks/stages_on_gpu.sh .qs/results
# (STAGES="curate tokenizer pretrain" runs only those, in that order.)
# Each stage runs as a job would (python -m lmforge.launch 1 lmforge.<stage> CONFIG OUT); prints each stage's
# manifest metrics and the evaluation table. Measured runs: benchmarks/results/gpu-h200.txt.
set -euo pipefail
results=$1
mkdir -p "$results/logs"
for stage in ${STAGES:-curate tokenizer baseline pretrain finetune quantize evaluate card}; do
  for config in "$results"/configs/$stage/*.yaml; do
    key=$(basename "$config" .yaml)
    started=$SECONDS
    if ! python3 -m lmforge.launch 1 "lmforge.$stage" "$config" "$results/$stage/$key" >"$results/logs/$stage-$key.log" 2>&1; then
      tail -40 "$results/logs/$stage-$key.log"
      exit 1
    fi
    echo "$stage $key $((SECONDS - started)) s $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["metrics"])' "$results/$stage/$key/manifest.json")"
  done
done
[[ -n "${STAGES:-}" ]] && exit 0
python3 - "$results" <<'PY'
import glob, json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
results = sys.argv[1]
[card] = glob.glob(f"{results}/card/*/model")
model, tokenizer = AutoModelForCausalLM.from_pretrained(card), AutoTokenizer.from_pretrained(card)
print("card model loads with plain transformers:", type(model).__name__, "quantization_config" in model.config.to_dict())
[report] = glob.glob(f"{results}/evaluate/*/results.json")
for name, metrics in json.load(open(report))["models"].items():
    print(name, {k: round(v, 4) for k, v in metrics.items() if "match" in k or "bits" in k})
PY
