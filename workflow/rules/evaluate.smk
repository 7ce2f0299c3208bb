rule evaluate:
    input:
        unpack(stage_inputs("evaluate")),
    output:
        directory(stage_dir("evaluate")),
    params:
        **stage_params("evaluate"),
    log:
        stage_log("evaluate"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("evaluate")
