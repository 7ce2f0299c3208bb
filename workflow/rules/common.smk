# Plans the run: expands a sweep into its configurations (lmforge.sweep; no sweep is one configuration),
# composes and validates each, and names every stage's directory by its config hash. Stages that
# configurations share are one job. Rules only wire these paths together; a job finds its stage by {key}.
import shlex
import sys

from lmforge import config as lmconfig
from lmforge import plan as lmplan
from lmforge import sweep as lmsweep
from lmforge import watch as lmwatch
from lmforge import workflow as lmworkflow
from snakemake.settings.types import DeploymentMethod

# Every job runs the interpreter that runs Snakemake (stage_command): the venv of env/setup.sh, or a conda
# environment made from env/environment.yml, on the filesystem the nodes share. The rules' `conda:` names
# that stack; an environment Snakemake would build for them has no lmforge in it and would go unused.
if workflow.deployment_settings.deployment_method & {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER}:
    raise WorkflowError(
        "lmforge's jobs run in the environment that runs Snakemake: drop --sdm/--software-deployment-method, "
        "and start Snakemake from the venv (bash env/setup.sh) or from a conda environment made with "
        "`conda env create -f env/environment.yml` (README: Deployment)."
    )


def hydra_overrides():
    """Hydra overrides: a list (`lmforge run` passes `--config 'overrides=["train.lr=1e-3", ...]'`), or one
    string split like a shell line (`--config overrides="train.lr=1e-3 finetune=lora"`)."""
    raw = config.get("overrides", "")
    return shlex.split(raw) if isinstance(raw, str) else [str(item) for item in raw]


try:
    SWEEP = lmsweep.plan(hydra_overrides())
except lmconfig.ConfigError as err:
    raise WorkflowError(f"Invalid lmforge config: {err}") from None

STAGES = SWEEP.stages  # stage name -> key -> Stage
RESULTS = SWEEP.results_dir
KEY = r"[0-9a-f]{12}"


onstart:
    # The resolved config of each stage, the one argument of `python -m lmforge.<stage>`. Written when a run
    # starts, holding Snakemake's lock, so a dry run or a second invocation that the lock stops changes nothing
    # (onstart runs neither on -n nor inside Slurm jobs, which get --no-hooks).
    lmworkflow.write_stage_configs(SWEEP, RESULTS)
    # Live run history: running and failed stages in MLflow while this Snakemake runs (lmforge.watch).
    lmwatch.start(SWEEP, RESULTS)


onsuccess:
    lmwatch.stop()


onerror:
    lmwatch.stop()


def stage_dir(name):
    return f"{RESULTS}/{name}/{{key}}"


def per_job(name, value):
    """A function of a job's wildcards: `value(stage)` of the job's own stage, found by its key."""
    stages = STAGES.get(name, {})
    return lambda wildcards: value(stages[wildcards.key])


def stage_inputs(name):
    """Input function: the upstream stage directories of the job."""
    return per_job(name, lambda stage: stage.config["inputs"])


def stage_params(name):
    # The config is a param, not an input: it is rewritten when a non-hashed setting (experiment name) changes.
    return {
        "stage": name,
        "config": lmworkflow.stage_config_path(RESULTS, name, "{key}"),
        "processes": per_job(name, lambda s: s.processes),
    }


def stage_log(name):
    return f"{RESULTS}/logs/{name}/{{key}}.log"


def stage_threads(name):
    return per_job(name, lambda stage: stage.resources.cpus)


def stage_resources(name):
    """Slurm resources of each job from its own stage's config (configurations of a sweep may differ)."""
    by_key = {key: lmworkflow.slurm_resources(stage) for key, stage in STAGES.get(name, {}).items()}
    return {resource: _resource(by_key, resource) for resource in sorted(set().union(*by_key.values()))}


def _resource(by_key, resource):
    # A resource only some stages of a sweep set (GPUs, a partition) is 0 or "" (unset) for the others;
    # tasks, 1: a single-process job in a sweep that also has multi-process ones.
    kind = type(next(resources[resource] for resources in by_key.values() if resource in resources))
    unset = 1 if resource == "tasks" else kind()

    def value(wildcards, attempt):
        amount = by_key[wildcards.key].get(resource, unset)
        return amount * attempt if resource == "runtime" else amount  # a retry gets more time

    return value


def stage_command():
    """The one command every stage rule runs; torch threads capped at the rule's CPUs per process.

    Every path is quoted (`:q`), and paths from config are restricted to safe characters at planning.
    The log is appended to: a resumed job's log keeps what the interrupted attempts wrote. The stage comes
    from params: a rule's shell command is evaluated when its job runs, after the loop defining it has ended.
    """
    # The interpreter running Snakemake: the job uses the same environment without activating it.
    python = shlex.quote(sys.executable)
    threads = "$(( {threads} / {params.processes} > 0 ? {threads} / {params.processes} : 1 ))"
    run = f"{python} -m lmforge.launch {{params.processes}} lmforge.{{params.stage}} {{params.config:q}} {{output:q}}"
    return f"OMP_NUM_THREADS={threads} {run} >> {{log:q}} 2>&1"


def configuration_keys():
    """The run key (the card's key) of every configuration this run plans."""
    return [run["card"].key for run in SWEEP.runs]


# The run section (results, experiment, sweep id, trackers) is the same in every configuration of a sweep.
RUN = SWEEP.runs[0]["card"].config["run"]
