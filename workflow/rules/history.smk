# Run history. Stage jobs only write run records into their own directories (lmforge.tracking); these local rules
# run where Snakemake runs (the login node, which holds the central MLflow store and may reach the internet).
# Before a configuration's card exists, lmforge.watch (started by common.smk's onstart) merges its running and
# failed stages every minute; `history` merges the finished configuration whole.
from lmforge import tracking


localrules:
    history,
    compare,
    wandb_sync,


PYTHON = shlex.quote(sys.executable)
# One MLflow experiment per sweep. It names the merge's output too: a configuration that joins a sweep after it
# ran on its own (same key) is merged again, into the sweep's experiment.
EXPERIMENT = tracking.experiment_name(RUN)
COMPARISON_DIR = f"{RESULTS}/report/{EXPERIMENT}"


rule history:
    input:
        stage_dir("card"),
    output:
        f"{RESULTS}/history/{EXPERIMENT}/{{key}}.json",
    params:
        config=stage_params("card")["config"],
    log:
        f"{RESULTS}/logs/history/{EXPERIMENT}/{{key}}.log",
    conda:
        "../../env/environment.yml"
    wildcard_constraints:
        key=KEY,
    shell:
        f"{PYTHON} -m lmforge.history merge {{params.config:q}} {{input:q}} {{output:q}} > {{log:q}} 2>&1"


rule compare:
    input:
        expand(rules.history.output[0], key=configuration_keys()),
    output:
        report(
            directory(COMPARISON_DIR),
            patterns=["{plot}.svg"],
            caption="../report/comparison.rst",
            category="Comparison",
        ),
    log:
        f"{RESULTS}/logs/compare/{EXPERIMENT}.log",
    conda:
        "../../env/environment.yml"
    shell:
        f"{PYTHON} -m lmforge.report {{output:q}} {{input:q}} > {{log:q}} 2>&1"


rule wandb_sync:
    input:
        stage_dir("card"),
    output:
        touch(f"{RESULTS}/wandb/synced/{{key}}"),
    log:
        f"{RESULTS}/logs/wandb_sync/{{key}}.log",
    conda:
        "../../env/environment.yml"
    wildcard_constraints:
        key=KEY,
    shell:
        f"{PYTHON} -m lmforge.history wandb-sync {{input:q}} > {{log:q}} 2>&1"
