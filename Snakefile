# lmforge: curate -> tokenizer -> baseline -> pretrain -> finetune -> quantize -> evaluate -> card.
# Configure with Hydra overrides:  snakemake --cores all --config overrides="train.lr=1e-3"
# A sweep is one DAG:               snakemake --cores all --config overrides="train.lr=1e-4,3e-4 sweep=..."
include: "workflow/rules/common.smk"
include: "workflow/rules/history.smk"  # before `all`, which names its outputs


report: "workflow/report/workflow.rst"


rule all:
    input:
        SWEEP.targets,
        COMPARISON_DIR,
        expand(rules.wandb_sync.output[0], key=configuration_keys()) if RUN["wandb"] else [],
    default_target: True


include: "workflow/rules/curate.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/card.smk"
include: "workflow/rules/scaling.smk"
