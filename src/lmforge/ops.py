"""DeepSpeed's compiled ops, built once per environment: `python -m lmforge.ops` (env/setup.sh runs it).

On CPU, DeepSpeed compiles a C++ op (deepspeed_shm_comm) the first time a training stage starts: minutes
of a job's walltime on a loaded node, and a compiler on the compute node. torch builds it under
~/.cache/torch_extensions/<python>_<accelerator>, a directory every environment of the user shares, and
guards each build with a `lock` file. A build killed midway (walltime, scancel, preemption) leaves the lock
behind, and every later job of that user then waits on it forever, printing nothing.

So the environment has its own extensions directory (TORCH_EXTENSIONS_DIR, set by lmforge.launch for
every stage), the op is built into it at setup, jobs find it built, and `lmforge doctor` and every stage's
log name a lock that is still there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# The op DeepSpeed's CPU accelerator loads in deepspeed.init_distributed.
CPU_OPS = ("ShareMemCommBuilder",)


def extensions_dir() -> Path:
    """This environment's own extensions directory, unless TORCH_EXTENSIONS_DIR says otherwise."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def locks(directory: Path | None = None) -> list[tuple[Path, float]]:
    """Build locks in the extensions directory, with their age in seconds: a build running, or a killed one."""
    directory = directory or extensions_dir()
    now = time.time()
    return [(lock, now - lock.stat().st_mtime) for lock in sorted(directory.glob("*/lock")) if lock.is_file()]


def describe_locks(directory: Path | None = None) -> list[str]:
    """One line per lock: what waits on it and how to clear it."""
    return [
        f"{lock} exists (for {age / 60:.0f} min): a DeepSpeed op build is running or was killed; a training job "
        f"waits until it is gone. If no build runs (`ps aux | grep ninja`), delete it."
        for lock, age in locks(directory)
    ]


def build() -> None:
    """Compile the CPU ops into extensions_dir() now, so no job compiles them."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import cpu

    for name in CPU_OPS:
        getattr(cpu, name)().load()
        print(f"built DeepSpeed op {name} in {extensions_dir()}")


if __name__ == "__main__":
    build()
