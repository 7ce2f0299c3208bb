"""Run lmforge stages as a user's job would: `python -m lmforge.<stage> CONFIG OUT`, on small inputs."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import sysconfig
import typing
from pathlib import Path

import yaml

from lmforge import config, schema
from lmforge import plan as planning

# A small slice of the standard library: enough text to train a tokenizer and a tiny model in seconds.
SMALL_CORPUS_FILES = [
    "argparse.py",
    "textwrap.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "bisect.py",
    "calendar.py",
    "difflib.py",
    "csv.py",
    "queue.py",
    "random.py",
    "statistics.py",
]

TINY = [
    "data.validation_fraction=0.2",
    "data.test_fraction=0.2",
    "tokenizer.vocab_size=512",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.max_seq_len=64",
    "train.steps=6",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "finetune.train.steps=6",
    "finetune.train.micro_batch_size=4",
    "finetune.train.warmup_steps=2",
    "finetune.train.eval_every=3",
    "finetune.train.eval_batches=2",
    "finetune.train.checkpoint_every=3",
    "eval.max_task_examples=8",
    "eval.max_test_documents=3",
    "eval.max_new_tokens=6",
    "eval.num_shots=1",
]


def small_corpus(directory: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    for name in SMALL_CORPUS_FILES:
        (directory / name).write_text((stdlib / name).read_text())
    return directory


def small_corpus_data(directory: Path) -> list[str]:
    """The data overrides of the small corpus written under `directory`: its source, name and licence."""
    # Python-2.0 (SPDX: the Python licence stack), not the stdlib config's PSF-2.0, which another source may not keep.
    return [f"data.source={small_corpus(directory)}", "data.name=stdlib-slice", "data.license=Python-2.0"]


# English prose without a line of Python: a corpus the built-in fine-tuning task finds nothing in.
PROSE_WORDS = (
    "the river morning garden window letter winter harbour quiet evening travellers found a small house near old "
    "bridge where children played and someone wrote long stories about distant mountains silver rain bright market "
    "people walked slowly through narrow streets while bells rang across fields of wheat under pale clouds"
).split()


def prose_corpus(directory: Path, files: int = 40, paragraphs: int = 12) -> Path:
    """Deterministic paragraphs of English words, in .txt files (about 200 KB by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for number in range(files):
        text = "\n\n".join(
            " ".join(
                " ".join(rng.choice(PROSE_WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
                for _ in range(rng.randint(4, 8))
            )
            for _ in range(paragraphs)
        )
        (directory / f"chapter_{number:02d}.txt").write_text(text + "\n")
    return directory


def curated_and_tokenized(root: Path) -> list[str]:
    """Run curate and tokenizer on the small corpus under `root`; the overrides that plan on top of them."""
    base = [*small_corpus_data(root / "corpus"), *TINY]
    stages = plan(root / "results", base)
    curated(stages)
    run_stage(stages["tokenizer"])
    run_stage(stages["tasks"])  # the built-in task's conversations, which fine-tuning reads
    return base


def curated(stages: dict[str, planning.Stage]) -> Path:
    """Run the curate_shard jobs and curate's merge; the curate stage's directory."""
    for stage in stages.values():
        if stage.name == "curate_shard":
            run_stage(stage)
    run_stage(stages["curate"])
    return Path(stages["curate"].dir)


def plan(results: Path, overrides: list[str]) -> dict[str, planning.Stage]:
    return planning.stages(config.load([f"run.results_dir={results}", *overrides]))


def stage_command(stage: planning.Stage, processes: int = 1) -> list[str]:
    """Write the stage's resolved config beside its output directory and return the command a job runs."""
    cfg_path = Path(stage.dir + ".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(stage.config))
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    return [*launcher, "-m", f"lmforge.{stage.name}", str(cfg_path), stage.dir]


def run_stage(stage: planning.Stage, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(stage_command(stage, processes), capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise AssertionError(f"{stage.name} failed:\n{run.stderr[-4000:]}")
    return run


def job_counts(snakemake_output: str) -> dict[str, int]:
    """Jobs per rule from the 'Job stats' table Snakemake prints (header, dashes, rows, then 'total')."""
    rows = [row.split() for row in snakemake_output.split("Job stats:")[1].splitlines()[3:] if row.strip()]
    counts = {}
    for name, count in rows:
        if name == "total":
            return counts
        counts[name] = int(count)
    raise ValueError("no 'total' row in the Job stats table")


def settings(section: type = schema.Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """(key, field, type) of every setting in the schema; one stage's resources stand for every stage's."""
    found = []
    types = typing.get_type_hints(section)
    for spec in dataclasses.fields(section):
        kind = types[spec.name]
        if dataclasses.is_dataclass(kind):
            found += settings(kind, f"{prefix}{spec.name}.")
        elif spec.name == "resources":
            found += settings(schema.StageResources, f"{prefix}resources.pretrain.")
        else:
            found.append((f"{prefix}{spec.name}", spec, kind))
    return found
