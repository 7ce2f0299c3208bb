"""Session-scoped pytest fixture: a real single-node Slurm cluster (env/slurm).

Wiring (either works; both together are fine, the plugin is registered once):

* tests/conftest.py:         ``pytest_plugins = ["tests.slurm_cluster"]``
* or in a test module:       ``pytest_plugins = ["tests.slurm_cluster"]``

Do not ``from tests.slurm_cluster import slurm_cluster`` into several modules: each
import creates its own session fixture and a second cluster start fails (there is one
/etc/slurm/slurm.conf per machine).  For the same reason this is not pytest-xdist safe.

The fixture runs env/slurm/install.sh (skips the test if Slurm cannot be installed:
not root, no apt-get, apt failure; under CI=true it fails the test instead, see
:func:`unavailable`), env/slurm/start.sh into a fresh state dir under /tmp (short
path: slurmd puts unix sockets there; world-readable so non-root job users work),
yields a :class:`SlurmCluster` and runs env/slurm/stop.sh at the end.  The state
dir (configs, daemon logs) is removed afterwards unless a test failed or
LMFORGE_KEEP_SLURM_STATE=1.  Since the config lives at /etc/slurm/slurm.conf, plain
``sbatch``/``squeue``/``snakemake --profile profiles/slurm-test`` work in tests without any
environment variables (the shipped profiles/slurm asks sacct, which needs slurmdbd).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_ENV_DIR = REPO_ROOT / "env" / "slurm"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm-test"

# Must match what start.sh is told to advertise (passed through the environment).
CPUS = int(os.environ.get("SLURM_TEST_CPUS", "8"))
GPUS = int(os.environ.get("SLURM_TEST_GPUS", "2"))


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    hostname: str
    cpu_partition: str = "cpu"  # Default=YES
    gpu_partition: str = "gpu"
    partitions: tuple[str, ...] = ("cpu", "gpu")
    cpus: int = CPUS  # advertised CPUs (may exceed the machine's)
    gpus: int = GPUS  # fake GPUs (symlinks to /dev/null), gres "gpu"
    profile: Path = SLURM_PROFILE
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_dir", self.state_dir / "log")

    def logs(self, lines: int = 40) -> str:
        """Tail of the daemon logs, for assertion messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.log_dir / name
            if p.exists():
                out.append(f"----- {p} -----")
                out.extend(p.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the real single-node Slurm test cluster (env/slurm)")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess[str], n: int = 60) -> str:
    text = (proc.stdout or "") + (proc.stderr or "")
    return "\n".join(text.splitlines()[-n:])


def must_run() -> bool:
    """Whether the Slurm tests may not be skipped: on CI (CI=true, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def unavailable(reason: str) -> NoReturn:
    """Skip a test that needs the cluster; on CI fail it, so a Slurm that cannot start cannot leave CI green."""
    if must_run():
        pytest.fail(f"{reason}\n(CI=true: the Slurm tests must run, not be skipped)", pytrace=False)
    pytest.skip(reason)


def _install() -> None:
    try:
        proc = _run(["bash", str(SLURM_ENV_DIR / "install.sh")], timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"Slurm test cluster unavailable: env/slurm/install.sh could not run: {exc}")
    if proc.returncode != 0:
        why = "not root" if os.geteuid() != 0 else "apt-get failed"
        unavailable(
            f"Slurm test cluster unavailable: Slurm cannot be installed ({why}); "
            f"env/slurm/install.sh exited {proc.returncode}:\n{_tail(proc)}"
        )


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest):
    if os.geteuid() != 0:
        unavailable("Slurm test cluster unavailable: needs root (starts slurmctld/slurmd, writes /etc/slurm)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        unavailable("Slurm test cluster unavailable: no apt-get to install Slurm and no slurmctld installed")
    _install()

    state_root = os.environ.get("LMFORGE_SLURM_STATE_ROOT", "/tmp")
    state_dir = Path(tempfile.mkdtemp(prefix="lmforge-slurm-", dir=state_root))
    state_dir.chmod(0o755)
    stop = ["bash", str(SLURM_ENV_DIR / "stop.sh"), str(state_dir)]
    try:
        proc = _run(["bash", str(SLURM_ENV_DIR / "start.sh"), str(state_dir)], timeout=180)
    except subprocess.TimeoutExpired:
        _run(stop, timeout=120)
        pytest.fail(f"env/slurm/start.sh {state_dir} timed out", pytrace=False)
    if proc.returncode != 0:
        _run(stop, timeout=120)
        pytest.fail(f"env/slurm/start.sh {state_dir} failed (rc={proc.returncode}):\n{_tail(proc, 200)}", pytrace=False)

    cluster = SlurmCluster(state_dir=state_dir, hostname=socket.gethostname().split(".")[0])
    try:
        yield cluster
    finally:
        res = _run(stop, timeout=120)
        if res.returncode != 0:
            print(f"env/slurm/stop.sh failed (rc={res.returncode}):\n{_tail(res)}")
        keep = os.environ.get("LMFORGE_KEEP_SLURM_STATE") == "1" or request.session.testsfailed
        if keep:
            print(f"Slurm test cluster state kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
