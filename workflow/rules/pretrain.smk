rule pretrain:
    input:
        unpack(stage_inputs("pretrain")),
    output:
        directory(stage_dir("pretrain")),
    params:
        config=stage_config("pretrain"),
    log:
        stage_log("pretrain"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("pretrain")
    resources:
        **stage_resources("pretrain", CFG.train.processes),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("pretrain", CFG.train.processes)
