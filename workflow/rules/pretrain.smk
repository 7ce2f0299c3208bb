rule pretrain:
    input:
        unpack(stage_inputs("pretrain")),
    output:
        directory(stage_dir("pretrain")),
    params:
        **stage_params("pretrain"),
    log:
        stage_log("pretrain"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("pretrain")
    resources:
        **stage_resources("pretrain"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("pretrain")
