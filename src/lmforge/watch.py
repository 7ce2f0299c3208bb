"""Live run history: while Snakemake runs, the records of the stages merged into MLflow every minute.

    python -m lmforge.watch PLAN.json SNAKEMAKE_PID [--every SECONDS]

A stage's job writes its run record into its own directory (lmforge.tracking); the `history` rule merges a
configuration's records once its card exists. Between the two, this watcher, started on the login node by the
workflow's `onstart` (workflow/rules/common.smk) and stopped by `onsuccess`/`onerror`, merges every
configuration's records as they are (lmforge.history.merge with final=False): a running stage appears as a
RUNNING run whose curves grow, a failed one as FAILED with its log. It reads only files, so the stage jobs need
no route to the login node or to an MLflow server.

It must not outlive Snakemake: it exits when its parent (Snakemake) is gone, without touching runs whose jobs
may still be running on the cluster. Stopped by Snakemake's hooks, it merges a last time and marks the runs of
stages still RUNNING as KILLED: Snakemake ends only when none of its jobs runs. `onstart` runs neither on
`snakemake -n` nor inside Slurm jobs (they get --no-hooks), so neither starts a watcher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge import history, stage, tracking

EVERY_S = 60  # between merges: the MLflow UI shows a curve at most this old
STOP_WAIT_S = 120  # the last merge of a large sweep may take a while
log = logging.getLogger(__name__)
_watcher: subprocess.Popen | None = None  # the watcher this Snakemake process started


def plan_of(sweep) -> dict:
    """What the watcher merges: each configuration's run config and stage directories (the plan's)."""
    return {
        "configurations": [
            {"run": run["card"].config["run"], "stages": {name: s.dir for name, s in run.items()}} for run in sweep.runs
        ]
    }


def start(sweep, results: str) -> None:
    """Start the watcher beside this Snakemake process (from `onstart`); its output goes to logs/watch.log."""
    global _watcher
    directory = Path(results) / "watch"
    directory.mkdir(parents=True, exist_ok=True)
    plan_file = directory / f"plan-{os.getpid()}.json"
    stage.write_json(plan_file, plan_of(sweep))
    log_file = Path(results) / "logs" / "watch.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        # Its own session: Ctrl-C reaches Snakemake, whose hooks stop the watcher after a last merge.
        _watcher = spawn(plan_file, os.getpid(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def spawn(plan_file: Path, parent_pid: int, every_s: float = EVERY_S, **popen_args) -> subprocess.Popen:
    """The watcher process. SIGTERM is blocked in it until its handler is in place (a blocked signal stays
    pending through exec), so a stop that comes while it is still importing is not lost."""
    command = [sys.executable, "-m", "lmforge.watch", str(plan_file), str(parent_pid), "--every", str(every_s)]
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the child inherits this thread's mask
    try:
        return subprocess.Popen(command, **popen_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def stop() -> None:
    """Stop the watcher (from `onsuccess`/`onerror`): it merges a last time, then exits."""
    global _watcher
    if _watcher is None:
        return
    _watcher.send_signal(signal.SIGTERM)
    try:
        _watcher.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        _watcher.kill()
        _watcher.wait()
    Path(_watcher.args[3]).unlink(missing_ok=True)  # its plan file (spawn's command)
    _watcher = None


class Watcher:
    """Merges a plan's configurations whose records changed since the last merge."""

    def __init__(self, plan: dict, started: float):
        self.configurations = plan["configurations"]
        self.seen: dict[str, tuple] = {}  # run_key -> the state of its records at the last merge
        self.started = started  # when Snakemake started its jobs (wrote the plan)

    def fingerprint(self, stages: dict) -> tuple:
        state = []
        for directory in stages.values():
            home = history.record_home(Path(directory))
            if home is not None:
                files = [home / tracking.RECORD_DIR / name for name in ("run.json", "metrics.jsonl")]
                state.append(tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files))
        return tuple(state)

    def merge(self) -> None:
        for configuration in self.configurations:
            run_cfg, stages = configuration["run"], configuration["stages"]
            state = self.fingerprint(stages)
            if not state or self.seen.get(run_cfg["run_key"]) == state:
                continue
            try:
                history.merge({name: Path(d) for name, d in stages.items()}, run_cfg, final=False)
            except Exception:  # a store that is busy or damaged now: the next merge tries again
                log.exception("merging %s", run_cfg["run_key"])
                continue
            self.seen[run_cfg["run_key"]] = state

    def failed_unrecorded(self) -> None:
        """Snakemake has ended: a stage without output or record whose log was written since Snakemake started
        is a job that failed before its stage began (an import error, a bad config): a FAILED run with its log."""
        for configuration in self.configurations:
            run_cfg, stages = configuration["run"], configuration["stages"]
            failed = []
            for name, directory in stages.items():
                job_log = history.stage_log(
                    run_cfg, {"name": name, "tags": {"lmforge.stage_key": Path(directory).name}}
                )
                started = job_log.exists() and job_log.stat().st_mtime >= self.started
                if started and history.record_home(Path(directory)) is None:
                    failed.append(name)
            if failed:
                log.info("%s failed before recording: %s", run_cfg["run_key"], ", ".join(failed))
                history.merge({n: Path(d) for n, d in stages.items()}, run_cfg, final=False, failed_unrecorded=failed)
                self.seen[run_cfg["run_key"]] = ()

    def mark_killed(self) -> None:
        """Snakemake has ended, so no job of its runs: a stage still RUNNING died without recording its end
        (KILLED). A configuration still RUNNING did not finish: FAILED if one of its stages failed, else KILLED."""
        from mlflow.tracking import MlflowClient

        for configuration in self.configurations:
            run_cfg = configuration["run"]
            if run_cfg["run_key"] not in self.seen:  # nothing of it merged: no store to open (or create)
                continue
            client = MlflowClient(tracking_uri=tracking.tracking_uri(run_cfg))
            experiment = client.get_experiment_by_name(tracking.experiment_name(run_cfg))
            if experiment is None:
                continue
            mine = f"tags.`{history.RUN_KEY_TAG}` = '{run_cfg['run_key']}'"
            with history.store_lock(tracking.tracking_uri(run_cfg)):
                running = client.search_runs([experiment.experiment_id], f"{mine} and attributes.status = 'RUNNING'")
                failed = client.search_runs([experiment.experiment_id], f"{mine} and attributes.status = 'FAILED'")
                # The stages first: the configuration's status follows from theirs.
                for run in sorted(running, key=lambda run: "lmforge.role" in run.data.tags):
                    status = "FAILED" if "lmforge.role" in run.data.tags and failed else "KILLED"
                    log.info("%s (%s) did not finish: %s", run.info.run_name, run.info.run_id, status)
                    client.set_terminated(run.info.run_id, status)


def watch(plan: dict, started: float, parent_pid: int, every_s: float) -> None:
    watcher = Watcher(plan, started)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by spawn
    log.info(
        "merging %d configurations every %g s while Snakemake (pid %d) runs",
        len(plan["configurations"]),
        every_s,
        parent_pid,
    )
    next_merge = 0.0
    while not stopping:
        if os.getppid() != parent_pid:  # Snakemake died (killed, its login session closed): so does its watcher
            log.info("Snakemake (pid %d) is gone: stopping", parent_pid)
            return
        if time.monotonic() >= next_merge:
            watcher.merge()
            next_merge = time.monotonic() + every_s
        time.sleep(min(1.0, every_s))
    watcher.merge()
    watcher.failed_unrecorded()
    watcher.mark_killed()
    log.info("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.watch")
    parser.add_argument("plan", type=Path, help="JSON written by lmforge.watch.start")
    parser.add_argument("parent_pid", type=int, help="the Snakemake process: the watcher exits when it is gone")
    parser.add_argument("--every", type=float, default=EVERY_S, help="seconds between merges")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    watch(json.loads(args.plan.read_text()), args.plan.stat().st_mtime, args.parent_pid, args.every)


if __name__ == "__main__":
    main()
