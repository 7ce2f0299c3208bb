rule card:
    input:
        unpack(stage_inputs("card")),
    output:
        directory(stage_dir("card")),
    params:
        **stage_params("card"),
    log:
        stage_log("card"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("card")
    resources:
        **stage_resources("card"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("card")
