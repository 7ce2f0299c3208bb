rule curate:
    output:
        directory(stage_dir("curate")),
    params:
        **stage_params("curate"),
    log:
        stage_log("curate"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("curate")
    resources:
        **stage_resources("curate"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("curate")
