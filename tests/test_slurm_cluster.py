"""Checks of the real single-node Slurm test cluster (env/slurm, tests/slurm_cluster.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster"]

pytestmark = pytest.mark.slurm


def _sh(cmd: list[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _wait_for(pred, timeout: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")


def test_node_and_partitions(slurm_cluster):
    out = _sh(["sinfo", "-h", "-o", "%P %t %c %G"]).stdout.split("\n")
    rows = {line.split()[0]: line.split()[1:] for line in out if line.strip()}
    assert set(rows) == {"cpu*", "gpu"}, out
    for state, cpus, gres in rows.values():
        assert state == "idle" and cpus == str(slurm_cluster.cpus) and gres.startswith(f"gpu:{slurm_cluster.gpus}")


def test_sbatch_wait_runs_and_writes_output(slurm_cluster, tmp_path):
    res = _sh(["sbatch", "--wait", "-o", "out.txt", "-t", "1", "--wrap", "echo hello job=$SLURM_JOB_ID"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr + slurm_cluster.logs()
    text = (tmp_path / "out.txt").read_text()
    assert text.startswith("hello job="), text
    assert text.strip().split("=")[1] in res.stdout  # "Submitted batch job N"


def test_gpu_job_sees_cuda_visible_devices(slurm_cluster, tmp_path):
    res = _sh(
        [
            "sbatch",
            "--wait",
            "-p",
            slurm_cluster.gpu_partition,
            "--gpus=1",
            "-o",
            "out.txt",
            "--wrap",
            "echo CVD=${CUDA_VISIBLE_DEVICES:-unset}",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr + slurm_cluster.logs()
    cvd = (tmp_path / "out.txt").read_text().strip().removeprefix("CVD=")
    assert cvd in {str(i) for i in range(slurm_cluster.gpus)}, cvd


def test_too_many_gpus_rejected_at_submit(slurm_cluster, tmp_path):
    res = _sh(["sbatch", "-p", "gpu", f"--gpus={slurm_cluster.gpus + 1}", "--wrap", "true"], cwd=tmp_path)
    assert res.returncode != 0
    assert "Requested node configuration is not available" in res.stderr, res.stderr


def test_time_over_partition_maxtime_rejected(slurm_cluster, tmp_path):
    res = _sh(["sbatch", "-t", "10-00:00:00", "--wrap", "true"], cwd=tmp_path)
    assert res.returncode != 0
    assert "time limit" in res.stderr.lower(), res.stderr


def test_requeue_reruns_running_job(slurm_cluster, tmp_path):
    log = tmp_path / "starts.log"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f'echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0\n'
        "sleep 120\n"
    )
    res = _sh(["sbatch", "--parsable", "-t", "5", "-o", "job.out", str(script)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]

    def starts() -> list[str]:
        return log.read_text().split() if log.exists() else []

    _wait_for(lambda: starts() == ["restart=0"], 20, "first start of the job", slurm_cluster)
    res = _sh(["scontrol", "requeue", job])
    assert res.returncode == 0, res.stderr
    # AuthInfo=cred_expire=10: the requeued job starts again after ~12 s.
    _wait_for(lambda: len(starts()) >= 2, 40, "restart after scontrol requeue", slurm_cluster)
    assert starts() == ["restart=0", "restart=1"]

    def state() -> str:
        return _sh(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"]).stdout.strip()

    _wait_for(lambda: state() == "COMPLETED", 15, "requeued job to complete", slurm_cluster)
