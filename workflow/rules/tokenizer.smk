rule tokenizer:
    input:
        unpack(stage_inputs("tokenizer")),
    output:
        directory(stage_dir("tokenizer")),
    params:
        **stage_params("tokenizer"),
    log:
        stage_log("tokenizer"),
    conda:
        "../../env/environment.yml"
    threads: stage_threads("tokenizer")
    resources:
        **stage_resources("tokenizer"),
    wildcard_constraints:
        key=KEY,
    shell:
        stage_command("tokenizer")
