rule finetune:
    input:
        unpack(stage_inputs("finetune")),
    output:
        directory(stage_dir("finetune")),
    params:
        config=stage_config("finetune"),
    log:
        stage_log("finetune"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("finetune")
    resources:
        **stage_resources("finetune", CFG.finetune.train.processes),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("finetune", CFG.finetune.train.processes)
