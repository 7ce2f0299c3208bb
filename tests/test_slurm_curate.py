"""Sharded curation on the single-node Slurm test cluster (tests/slurm_cluster.py): data.shards=8 is 8
curate_shard Slurm jobs and one curate job after them, keeping exactly the documents of a 1-shard run."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.stages import TINY
from tests.test_curate_sources import GENERATED, curated_ids, mixed_corpus
from tests.test_slurm_pipeline import cancel_run, epoch, run_id, run_snakemake, slurm_jobs

pytestmark = pytest.mark.slurm


def test_eight_shard_jobs_then_a_merge_keep_the_documents_of_one_shard(slurm_cluster, tmp_path):
    corpus = mixed_corpus(tmp_path / "generated")
    base = [f"data.source={corpus}", *GENERATED, *TINY]
    kept = {}
    for shards, on_slurm in ((8, True), (1, False)):
        workdir = tmp_path / f"shards{shards}"
        overrides = [*base, f"data.shards={shards}", f"run.results_dir={workdir}/results"]
        run, _ = run_snakemake(workdir, overrides, "--until", "curate", slurm=on_slurm)
        output = run.stdout + run.stderr
        try:
            assert run.returncode == 0, output[-6000:] + (slurm_cluster.logs() if on_slurm else "")
        finally:
            if on_slurm:
                cancel_run(output)
        if on_slurm:
            jobs = slurm_jobs(run_id(output))
            rule = {job["JobId"]: re.fullmatch(r"rule_(\w+?)_wildcards_[0-9a-f]{12}", job["Comment"]).group(1) for job in jobs}  # fmt: skip
            assert Counter(rule.values()) == {"curate_shard": 8, "curate": 1}
            assert all(job["JobState"] == "COMPLETED" for job in jobs)
            [merge] = [job for job in jobs if rule[job["JobId"]] == "curate"]
            shard_ends = [epoch(job["EndTime"]) for job in jobs if rule[job["JobId"]] == "curate_shard"]
            assert epoch(merge["StartTime"]) >= max(shard_ends)
        kept[shards] = curated_ids(workdir / "results")
    assert kept[8] == kept[1] and len(kept[1]) > 40
