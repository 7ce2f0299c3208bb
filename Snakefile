# lmforge: curate -> tokenizer -> baseline -> pretrain -> finetune -> quantize -> evaluate -> card.
# Configure with Hydra overrides:  lmforge run train.lr=1e-3             (or: snakemake --config overrides="...")
# A sweep is one DAG:               lmforge run train.lr=1e-4,3e-4 finetune=full,lora
include: "workflow/rules/common.smk"
include: "workflow/rules/history.smk"  # before `all`, which names its outputs


report: "workflow/report/workflow.rst"


rule all:
    input:
        SWEEP.targets,
        COMPARISON_DIR,
        expand(rules.wandb_sync.output[0], key=configuration_keys()) if RUN["wandb"] else [],
    default_target: True


include: "workflow/rules/stages.smk"
