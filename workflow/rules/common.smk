# Plans the run: composes the Hydra config once, validates it, and names every
# stage's directory by its config hash. Rules only wire these paths together.
import shlex
import sys

import yaml

from lmforge import config as lmconfig


def hydra_overrides():
    """`--config overrides="train.lr=1e-3 finetune=lora"` (Hydra override syntax)."""
    raw = config.get("overrides", "")
    return shlex.split(raw) if isinstance(raw, str) else [str(item) for item in raw]


try:
    CFG = lmconfig.load(hydra_overrides())
except lmconfig.ConfigError as err:
    raise WorkflowError(f"Invalid lmforge config: {err}") from None

STAGES = lmconfig.plan(CFG)
RESULTS = CFG.run.results_dir
KEY = r"[0-9a-f]{12}"


def _write_stage_configs():
    """The resolved config of each stage, the one argument of `python -m lmforge.<stage>`."""
    for stage in STAGES.values():
        path = Path(f"{RESULTS}/configs/{stage.name}/{stage.key}.yaml")
        text = yaml.safe_dump(stage.config, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.rename(path)


_write_stage_configs()


def stage_dir(name):
    return f"{RESULTS}/{name}/{{key}}"


def stage_inputs(name):
    """Input function: the upstream stage directories of stage `name` with key `wildcards.key`."""
    by_key = {stage.key: stage for stage in STAGES.values() if stage.name == name}
    return lambda wildcards: by_key[wildcards.key].config["inputs"]


def stage_config(name):
    # A param, not an input: the file is rewritten when a non-hashed setting (experiment name) changes.
    return f"{RESULTS}/configs/{name}/{{key}}.yaml"


def stage_log(name):
    return f"{RESULTS}/logs/{name}/{{key}}.log"


def stage_resources(name, processes=1):
    """Slurm resources of a stage from the config's `resources` section; runtime grows with each retry."""
    res = lmconfig.resources(CFG, name)
    resources = {
        "mem_mb": res.mem_mb,
        "runtime": lambda wildcards, attempt: res.runtime * attempt,
        "cpus_per_task": res.cpus,
        "nodes": res.nodes,
    }
    if res.gpus:
        resources["gpu"] = res.gpus
    if res.partition:
        resources["slurm_partition"] = res.partition
    if processes > 1:
        # N Slurm tasks, and the plugin's MPI path: the command runs once and lmforge.launch starts the tasks.
        resources.update(tasks=processes, mpi="srun")
    if res.signal_before_end_s:
        # To every process of the job's steps (no "B:"), so the training process itself gets it; requeue after
        # preemption. No quotes: the plugin pastes slurm_extra into a shell command line. URG, not USR1: the
        # Snakemake (and torchrun) processes around the trainer get it too; USR1 kills them, URG they ignore.
        resources["slurm_extra"] = f"--signal=URG@{res.signal_before_end_s} --requeue"
    return resources


def stage_threads(name):
    return lmconfig.resources(CFG, name).cpus


def stage_command(name, processes=1):
    """The one command every rule runs; torch threads capped at the rule's CPUs per process."""
    # The interpreter running Snakemake: the job uses the same environment without activating it.
    python = shlex.quote(sys.executable)
    entry = f"lmforge.{name}" if processes == 1 else f"lmforge.launch {processes} lmforge.{name}"
    threads = "$(( {threads} / %d > 0 ? {threads} / %d : 1 ))" % (processes, processes)
    return f"OMP_NUM_THREADS={threads} {python} -m {entry} {{params.config}} {{output}} > {{log}} 2>&1"


def configuration_keys():
    """The run key (the card's key) of every configuration this run plans."""
    return [STAGES["card"].key]
