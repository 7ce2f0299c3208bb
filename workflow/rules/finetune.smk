rule finetune:
    input:
        unpack(stage_inputs("finetune")),
    output:
        directory(stage_dir("finetune")),
    params:
        **stage_params("finetune"),
    log:
        stage_log("finetune"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("finetune")
    resources:
        **stage_resources("finetune"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("finetune")
