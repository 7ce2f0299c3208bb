rule quantize:
    input:
        unpack(stage_inputs("quantize")),
    output:
        directory(stage_dir("quantize")),
    params:
        **stage_params("quantize"),
    log:
        stage_log("quantize"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("quantize")
    resources:
        **stage_resources("quantize"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("quantize")
