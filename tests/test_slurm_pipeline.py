"""The DAG through `--profile profiles/slurm-test` on the single-node test cluster (tests/slurm_cluster.py).

Every rule must become one Slurm job with the resources of conf/resources/default.yaml and give the
same results as a local run; a job that Slurm requeues (preemption) must resume bitwise; a training
longer than its walltime must go on, by requeueing itself at each walltime warning, to the weights of
an uninterrupted run, in one Snakemake invocation; a failing job must be reported with its Slurm id and
log and be retried by Snakemake with twice the time.
Run with `pytest -s` to see the timings, the number of status queries and of requeues.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from lmforge import config, plan, train_loop
from lmforge.workflow import snakemake_command
from tests.slurm_cluster import SLURM_PROFILE
from tests.stages import TINY, small_corpus_data

pytestmark = pytest.mark.slurm

RULES = ("curate_shard", "curate", "tasks", "tokenizer", "baseline", "pretrain", "finetune", "quantize", "evaluate", "card")
GPU_STAGES = ("pretrain", "finetune", "evaluate")
GPU_RESOURCES = [f"resources.{s}.{k}={v}" for s in GPU_STAGES for k, v in (("partition", "gpu"), ("gpus", 1))]
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One corpus; a working directory for the Slurm runs and one for the local runs, shared by the tests
    so that curate and tokenizer (same keys in every test) run once per directory."""
    root = tmp_path_factory.mktemp("slurm_pipeline")
    return {"corpus": small_corpus_data(root / "corpus"), "slurm": root / "slurm", "local": root / "local", "root": root}


@pytest.fixture(scope="module")
def squeue_log(dirs):
    """A `squeue` first on Snakemake's PATH that logs each call; jobs get the PATH without it (via `sbatch`)."""
    bin_dir, log = dirs["root"] / "wrappers", dirs["root"] / "squeue_calls.log"
    bin_dir.mkdir()
    clean_path = os.environ["PATH"]
    for name, body in {
        "squeue": f'echo "$*" >> {log}\nexec {shutil.which("squeue")} "$@"\n',
        "sbatch": f"PATH='{clean_path}' exec {shutil.which('sbatch')} \"$@\"\n",
    }.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def overrides(dirs, where: str, *extra: str) -> list[str]:
    return [*TINY, *dirs["corpus"], f"run.results_dir={dirs[where]}/results", *extra]


def snakemake_cmd(workdir: Path, ovr: list[str], *targets: str, slurm: bool, args=()) -> list[str]:
    # ovr names run.results_dir=workdir/results too (config.load of the tests needs it): the same value twice.
    executor = {"profile": SLURM_PROFILE} if slurm else {}
    cores = [] if slurm else ["--cores", "2"]
    return snakemake_command(workdir / "results", ovr, *targets, *cores, *args, **executor)


def run_snakemake(workdir, ovr, *targets, slurm, env=None, timeout=600, args=()):
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run = subprocess.run(
        snakemake_cmd(workdir, ovr, *targets, slurm=slurm, args=args),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return run, time.monotonic() - started


def start_snakemake(workdir, ovr, *targets, slurm, output: Path, args=()) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    with output.open("w") as out:
        return subprocess.Popen(
            snakemake_cmd(workdir, ovr, *targets, slurm=slurm, args=args), stdout=out, stderr=subprocess.STDOUT
        )


def finish(proc: subprocess.Popen, output: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(30)
        pytest.fail(f"snakemake did not finish in {timeout}s:\n{output.read_text()[-5000:]}")
    return output.read_text()


def run_id(output: str) -> str:
    return re.search(r"SLURM run ID: (\S+)", output).group(1)


def cancel_run(output: str) -> None:
    """Leave no job of a failed test running on the shared session cluster."""
    if match := re.search(r"SLURM run ID: (\S+)", output):
        subprocess.run(["scancel", "--name", match.group(1)], capture_output=True)


def slurm_jobs(name: str) -> list[dict[str, str]]:
    """The jobs of one Snakemake run (job name = its SLURM run ID), from `scontrol show job -o`."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = [dict(field.partition("=")[::2] for field in line.split()) for line in out.splitlines() if line.strip()]
    return sorted((job for job in jobs if job.get("JobName") == name), key=lambda job: int(job["JobId"]))


def slurm_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(field.partition("=")[::2] for field in out.stdout.split())


def minutes(limit: str) -> int:
    """Slurm's [D-]HH:MM:SS as minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) before {what}:\n{output.read_text()[-5000:]}")
        time.sleep(0.2)
    proc.terminate()
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{output.read_text()[-5000:]}")


def rule_job(name: str, rule: str, state: str = "RUNNING") -> str | None:
    """The id of the run's (last) job of `rule` in `state`."""
    jobs = [job["JobId"] for job in slurm_jobs(name) if job["Comment"].startswith(f"rule_{rule}_")]
    return jobs[-1] if jobs and slurm_job(jobs[-1])["JobState"] == state else None


def finished_at(output: str) -> dict[str, float]:
    """When Snakemake noticed each rule's job finish (its log's time stamps), as epoch seconds."""
    stamps = re.finditer(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\nFinished jobid: \d+ \(Rule: (\w+)\)", output)
    return {m.group(2): time.mktime(time.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")) for m in stamps}


def epoch(slurm_time: str) -> float:
    return time.mktime(time.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S"))


def model_bytes(stage: plan.Stage) -> bytes:
    return (Path(stage.dir) / "model" / "model.safetensors").read_bytes()


def test_dag_runs_as_slurm_jobs(slurm_cluster, dirs, squeue_log):
    bin_dir, calls_log = squeue_log
    slurm_ovr = overrides(dirs, "slurm", *GPU_RESOURCES)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run, slurm_wall = run_snakemake(dirs["slurm"], slurm_ovr, slurm=True, env=env)
    output = run.stdout + run.stderr
    try:
        assert run.returncode == 0, output[-6000:] + slurm_cluster.logs()
    finally:
        cancel_run(output)

    cfg = config.load(slurm_ovr)
    jobs = slurm_jobs(run_id(output))
    by_rule = {}
    for job in jobs:
        rule = re.fullmatch(r"rule_(\w+?)_wildcards_([0-9a-f]{12})", job["Comment"]).group(1)
        assert rule not in by_rule, f"two jobs for rule {rule}"
        by_rule[rule] = job
    assert sorted(by_rule) == sorted(RULES)
    for rule, job in by_rule.items():
        res = plan.resources(cfg, rule)
        assert job["JobState"] == "COMPLETED", (rule, job["JobState"])
        assert job["Partition"] == (res.partition or slurm_cluster.cpu_partition), rule
        gpu_fields = " ".join(job.get(k, "") for k in ("TresPerJob", "TresPerNode", "TRES", "Gres"))
        assert ("gpu" in gpu_fields) == (rule in GPU_STAGES), (rule, gpu_fields)
        if rule in GPU_STAGES:
            assert re.search(r"gres/gpu[:=]1\b|gpu:1\b", gpu_fields), (rule, gpu_fields)
        assert (job["CPUs/Task"], job["NumCPUs"]) == (str(res.cpus), str(res.cpus)), rule
        assert job["MinMemoryNode"] == f"{res.mem_mb}M", rule
        assert minutes(job["TimeLimit"]) == res.runtime, rule
        assert job["NumNodes"] == str(res.nodes), rule
        slurm_log = dirs["slurm"] / "results" / "logs" / "slurm" / f"rule_{rule}"
        assert (slurm_log / job["Comment"].rsplit("_", 1)[1] / f"{job['JobId']}.log").exists(), rule

    local_ovr = overrides(dirs, "local")
    local, local_wall = run_snakemake(dirs["local"], local_ovr, slurm=False)
    assert local.returncode == 0, local.stderr[-6000:]

    # One job per stage here (data.shards=1): by stage name.
    slurm_stages, local_stages = ({s.name: s for s in plan.stages(c).values()} for c in (cfg, config.load(local_ovr)))
    for name in RULES:
        on_slurm, here = slurm_stages[name], local_stages[name]
        assert on_slurm.key == here.key, name
        slurm_manifest = json.loads((Path(on_slurm.dir) / "manifest.json").read_text())
        local_manifest = json.loads((Path(here.dir) / "manifest.json").read_text())
        assert slurm_manifest["metrics"] == local_manifest["metrics"], name
    assert model_bytes(slurm_stages["pretrain"]) == model_bytes(local_stages["pretrain"])

    squeue_calls = len(calls_log.read_text().splitlines())
    runtimes = {rule: epoch(job["EndTime"]) - epoch(job["StartTime"]) for rule, job in by_rule.items()}
    noticed = finished_at(output)
    delays = {rule: noticed[rule] - epoch(job["EndTime"]) for rule, job in by_rule.items()}
    print(
        f"\nSlurm run: {slurm_wall:.0f} s wall, {len(RULES)} jobs; seconds in each job: "
        + ", ".join(f"{rule} {runtimes[rule]:.0f}" for rule in RULES)
        + "\n  seconds from job end to Snakemake noticing it (status polling): "
        + ", ".join(f"{rule} {delays[rule]:.0f}" for rule in RULES)
        + f" (mean {sum(delays.values()) / len(delays):.1f})"
        + f"\nlocal run: {local_wall:.0f} s wall (--cores 2)"
        + f"\nSlurm overhead per rule: {(slurm_wall - local_wall) / len(RULES):.1f} s"
        + f"\nstatus queries: {squeue_calls} squeue calls ({squeue_calls / len(RULES):.1f} per rule)"
    )


def test_requeued_training_resumes_bitwise(slurm_cluster, dirs, tmp_path):
    # `scontrol requeue` from outside, as Slurm requeues a preempted job (--requeue): SIGTERM, then the same id.
    # ~100 tiny steps: a few seconds of training after the first checkpoint (step 10) to requeue in.
    steps = ["train.steps=100", "train.checkpoint_every=10", "train.eval_every=50"]
    slurm_ovr = overrides(dirs, "slurm", *steps)
    pretrain = plan.stages(config.load(slurm_ovr))["pretrain"]
    checkpoint = Path(pretrain.config["run"]["checkpoint_dir"])
    shutil.rmtree(checkpoint, ignore_errors=True)

    output = tmp_path / "snakemake.out"
    proc = start_snakemake(dirs["slurm"], slurm_ovr, pretrain.dir, slurm=True, output=output)
    try:
        wait_for(lambda: "SLURM run ID" in output.read_text(), 60, "the SLURM run ID", proc, output)
        name = run_id(output.read_text())
        wait_for(lambda: rule_job(name, "pretrain"), 180, "the pretrain job to run", proc, output)
        job_id = rule_job(name, "pretrain")
        wait_for(lambda: (checkpoint / "latest").exists(), 180, "the first checkpoint", proc, output)
        requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        assert requeue.returncode == 0, requeue.stderr
        requeued_at = time.time()
        text = finish(proc, output, timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()
        cancel_run(output.read_text())
    assert proc.returncode == 0, text[-6000:] + slurm_cluster.logs()

    job = slurm_job(job_id)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), job
    print(
        f"\nrequeue: job {job_id} restarted {epoch(job['StartTime']) - requeued_at:.0f} s after `scontrol requeue`, "
        f"ran {epoch(job['EndTime']) - epoch(job['StartTime']):.0f} s more; "
        f"Snakemake noticed its end {finished_at(text)['pretrain'] - epoch(job['EndTime']):.0f} s later"
    )
    stage_log = (dirs["slurm"] / "results" / "logs" / "pretrain" / f"{pretrain.key}.log").read_text()
    assert f"resumed from {checkpoint} at step" in stage_log, stage_log[-3000:]

    local_ovr = overrides(dirs, "local", *steps)
    local_pretrain = plan.stages(config.load(local_ovr))["pretrain"]
    assert local_pretrain.key == pretrain.key
    shutil.rmtree(local_pretrain.config["run"]["checkpoint_dir"], ignore_errors=True)
    local, _ = run_snakemake(dirs["local"], local_ovr, local_pretrain.dir, slurm=False)
    assert local.returncode == 0, local.stderr[-6000:]
    local_log = (dirs["local"] / "results" / "logs" / "pretrain" / f"{pretrain.key}.log").read_text()
    assert "resumed from" not in local_log
    assert model_bytes(pretrain) == model_bytes(local_pretrain)


# ~160 s of training on 2 CPU cores (TINY: ~75 steps/s). A job of the chain spends ~20 s starting (Snakemake's job
# step, then the stage's imports), and Slurm sends the warning at its first time-limit check (every 30 s) less
# than signal_before_end_s = 35 s before the end: 85-115 s into a 2-minute job. So each job trains 65-95 s, and
# the training needs 2 jobs at least, 3 here. A 1-minute walltime, as the issue has it, would leave 5-35 s per
# job: a dozen jobs for the same training. Not beside the local run: two 2-thread trainings on 2 cores ran some
# 40 times slower.
WALLTIME_STEPS = 12000


def test_training_past_the_walltime_requeues_itself_to_the_end(slurm_cluster, dirs, tmp_path):
    """One Snakemake run and one Slurm job id: at each walltime warning the trainer checkpoints and requeues
    its job, which resumes, until the last step; the weights equal those of an uninterrupted local run."""
    steps = [f"train.{every}={WALLTIME_STEPS}" for every in ("steps", "checkpoint_every", "eval_every")]
    walltime = ["resources.pretrain.runtime=2", "resources.pretrain.signal_before_end_s=35"]
    slurm_ovr, local_ovr = overrides(dirs, "slurm", *steps, *walltime), overrides(dirs, "local", *steps)
    pretrain, local_pretrain = (plan.stages(config.load(ovr))["pretrain"] for ovr in (slurm_ovr, local_ovr))
    assert pretrain.key == local_pretrain.key  # resources are not part of the key
    checkpoint = Path(pretrain.config["run"]["checkpoint_dir"])
    for stage in (pretrain, local_pretrain):
        shutil.rmtree(stage.config["run"]["checkpoint_dir"], ignore_errors=True)

    run, slurm_wall = run_snakemake(dirs["slurm"], slurm_ovr, pretrain.dir, slurm=True, timeout=900)
    text = run.stdout + run.stderr
    try:
        assert run.returncode == 0, text[-6000:] + slurm_cluster.logs()
    finally:
        cancel_run(text)
    [job] = [job for job in slurm_jobs(run_id(text)) if job["Comment"] == f"rule_pretrain_wildcards_{pretrain.key}"]
    restarts = int(job["Restarts"])
    assert job["JobState"] == "COMPLETED" and restarts >= 1, job
    assert [m.group(1) for m in SUBMITTED.finditer(text)].count(job["JobId"]) == 1 and "Error in rule" not in text

    # Snakemake empties the stage log when a job (re)starts; the manifest keeps every attempt and its exit message.
    attempts = json.loads((Path(pretrain.dir) / "manifest.json").read_text())["attempts"]
    assert [attempt["slurm_job_id"] for attempt in attempts] == [job["JobId"]] * (restarts + 1)
    assert [attempt["status"] for attempt in attempts] == ["FAILED"] * restarts + ["FINISHED"]
    stops = [
        re.fullmatch(
            rf"SystemExit: SIGURG received: checkpoint saved at step (\d+) in {re.escape(str(checkpoint))}; "
            rf"requeued Slurm job {job['JobId']} \(requeue {requeue}\) to resume from step \1",
            attempt["error"],
        )
        for requeue, attempt in enumerate(attempts[:-1], 1)
    ]
    assert all(stops), [attempt["error"] for attempt in attempts]
    stopped_at = [int(stop.group(1)) for stop in stops]
    assert stopped_at == sorted(set(stopped_at)) and stopped_at[-1] < WALLTIME_STEPS  # each job trained
    stage_log = (dirs["slurm"] / "results" / "logs" / "pretrain" / f"{pretrain.key}.log").read_text()
    assert f"resumed from {checkpoint} at step {stopped_at[-1]} of {WALLTIME_STEPS}" in stage_log

    local, local_wall = run_snakemake(dirs["local"], local_ovr, local_pretrain.dir, slurm=False)
    assert local.returncode == 0, local.stderr[-6000:]
    assert model_bytes(pretrain) == model_bytes(local_pretrain)
    times = [(datetime.fromisoformat(a["started"]), datetime.fromisoformat(a["ended"])) for a in attempts]
    gaps = [(start - end).total_seconds() for (_, end), (start, _) in zip(times, times[1:])]
    print(
        f"\nwalltime: {restarts + 1} two-minute runs of Slurm job {job['JobId']}, stopped at steps "
        f"{', '.join(map(str, stopped_at))} of {WALLTIME_STEPS}; {slurm_wall:.0f} s wall (local, uninterrupted: "
        f"{local_wall:.0f} s); from one run's exit to the next one's start: {', '.join(f'{g:.0f}' for g in gaps)} s"
    )


def test_a_job_that_trained_no_further_since_its_last_requeue_is_not_requeued(tmp_path, monkeypatch):
    """It did not resume from the checkpoint it left (one on node-local disk, say): requeueing would loop."""
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    (tmp_path / train_loop.REQUEUED).write_text(json.dumps({"job": "12345", "step": 40, "requeues": 3}))
    outcome = train_loop.requeue_slurm_job(40, tmp_path)
    assert outcome.startswith("not requeued: Slurm job 12345 requeued itself at step 40") and "rerun" in outcome
    assert json.loads((tmp_path / train_loop.REQUEUED).read_text())["requeues"] == 3


def test_failed_job_is_reported_and_retried_with_more_time(slurm_cluster, dirs, tmp_path):
    # A file where the checkpoint directory goes: the first attempt fails at its first checkpoint. Removed once
    # that job has failed, before the retry (submitted after the next status check) gets there.
    # train.warmup_steps=3: a pretraining of its own, not the one test_dag_runs_as_slurm_jobs left finished here.
    walltime = ["resources.pretrain.runtime=1", "resources.pretrain.signal_before_end_s=null"]
    ovr = overrides(dirs, "slurm", "train.warmup_steps=3", *walltime)
    pretrain = plan.stages(config.load(ovr))["pretrain"]
    checkpoint = Path(pretrain.config["run"]["checkpoint_dir"])
    shutil.rmtree(checkpoint, ignore_errors=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text("not a directory")

    output = tmp_path / "snakemake.out"
    proc = start_snakemake(dirs["slurm"], ovr, pretrain.dir, slurm=True, output=output, args=["--retries", "1"])
    try:
        wait_for(lambda: "SLURM run ID" in output.read_text(), 60, "the SLURM run ID", proc, output)
        name = run_id(output.read_text())
        wait_for(lambda: rule_job(name, "pretrain"), 180, "the pretrain job to run", proc, output)
        first = rule_job(name, "pretrain")
        wait_for(lambda: slurm_job(first)["JobState"] == "FAILED", 120, "the first job to fail", proc, output)
        checkpoint.unlink()
        text = finish(proc, output, timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()
        cancel_run(output.read_text())
    assert proc.returncode == 0, text[-6000:] + slurm_cluster.logs()

    pretrain_jobs = [job for job in slurm_jobs(name) if job["Comment"] == f"rule_pretrain_wildcards_{pretrain.key}"]
    assert [job["JobId"] for job in pretrain_jobs][0] == first
    assert [job["JobState"] for job in pretrain_jobs] == ["FAILED", "COMPLETED"]
    assert [minutes(job["TimeLimit"]) for job in pretrain_jobs] == [1, 2]
    failed, again = pretrain_jobs
    print(
        f"\nretry: job {again['JobId']} submitted {epoch(again['SubmitTime']) - epoch(failed['EndTime']):.0f} s "
        f"after job {first} failed (status polling), ran {epoch(again['EndTime']) - epoch(again['StartTime']):.0f} s"
    )

    first_log = dirs["slurm"] / "results" / "logs" / "slurm" / "rule_pretrain" / pretrain.key / f"{first}.log"
    error = text[text.index("Error in rule pretrain:") :]
    assert f"SLURM-job '{first}' failed" in error and str(first_log) in error, error[:3000]
    assert f"external_jobid: {first}" in error
    assert "Trying to restart job" in text
    assert [m.group(1) for m in SUBMITTED.finditer(text)][-2:] == [first, again["JobId"]]
    assert first_log.exists()
    manifest = json.loads((Path(pretrain.dir) / "manifest.json").read_text())
    assert [(attempt["slurm_job_id"], attempt["status"]) for attempt in manifest["attempts"]] == [
        (first, "FAILED"),
        (again["JobId"], "FINISHED"),
    ]
    assert str(checkpoint) in manifest["attempts"][0]["error"]
    assert manifest["metrics"]["steps"] == 6


def test_two_process_training_runs_as_two_slurm_tasks(slurm_cluster, dirs):
    """train.processes=2: one Slurm job with 2 tasks started by srun, equal to 2 local torchrun processes."""
    extra = ("train.processes=2", "train.steps=8")
    slurm_ovr, local_ovr = overrides(dirs, "slurm", *extra), overrides(dirs, "local", *extra)
    slurm_stage = plan.stages(config.load(slurm_ovr))["pretrain"]
    run, _ = run_snakemake(dirs["slurm"], slurm_ovr, slurm_stage.dir, slurm=True)
    output = run.stdout + run.stderr
    try:
        assert run.returncode == 0, output[-6000:]
    finally:
        cancel_run(output)
    [job] = [j for j in slurm_jobs(run_id(output)) if j["Comment"].startswith("rule_pretrain_")]
    assert job["NumTasks"] == "2", job
    local_stage = plan.stages(config.load(local_ovr))["pretrain"]
    local, _ = run_snakemake(dirs["local"], local_ovr, local_stage.dir, slurm=False)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    assert model_bytes(slurm_stage) == model_bytes(local_stage)
