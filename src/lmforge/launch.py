"""Start N processes of a training stage: `python -m lmforge.launch N lmforge.pretrain CONFIG OUT`.

Every rule runs its stage through this command; with N = 1 it becomes the stage process (exec).

Inside a Slurm job, `srun -n N` starts one task per GPU and each task reads its rank from Slurm (through
submitit, in train_loop.setup_distributed); on a workstation or in CI, torch.distributed.run starts them.
The Snakemake rule asks Slurm for N tasks, so this command itself runs once.

Slurm's walltime warning (SIGURG) may come while the stage is still importing torch, before the training
loop has its handler, and an unhandled SIGURG is dropped. It is blocked here instead: a blocked signal stays
pending through exec, and train_loop.StopRequested unblocks it once its handler is in place.

DeepSpeed's compiled ops come from this environment's own directory (lmforge.ops), and a build lock left
there by a killed job is named in the stage's log before the stage would wait on it.
"""

import logging
import os
import shutil
import signal
import sys

from lmforge import ops

log = logging.getLogger("lmforge.launch")


def main() -> None:
    processes, module, *args = sys.argv[1:]
    if processes == "1":
        command = [sys.executable, "-m", module, *args]
    elif os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        command = ["srun", f"--ntasks={processes}", sys.executable, "-m", module, *args]
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # lets submitit.JobEnvironment read the tasks' Slurm variables
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            module,
            *args,
        ]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ops.extensions_dir())
    for lock in ops.describe_locks():
        log.warning(lock)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGURG})
    os.execvp(command[0], command)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
