rule baseline:
    input:
        unpack(stage_inputs("baseline")),
    output:
        directory(stage_dir("baseline")),
    params:
        **stage_params("baseline"),
    log:
        stage_log("baseline"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("baseline")
    resources:
        **stage_resources("baseline"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("baseline")
