# The scaling-law fit of a sweep whose pretraining runs differ in both the model and train.steps
# (lmforge.sweep.scaling_stage); other DAGs have no job of it. `snakemake --until scaling` runs the
# pretraining ladder and the fit only.
rule scaling:
    input:
        unpack(stage_inputs("scaling")),
    output:
        directory(stage_dir("scaling")),
    params:
        **stage_params("scaling"),
    log:
        stage_log("scaling"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("scaling")
    resources:
        **stage_resources("scaling"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("scaling")
