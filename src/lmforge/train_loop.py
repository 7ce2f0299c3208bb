"""The DeepSpeed training loop shared by pretraining and fine-tuning.

One code path for 1 CPU process (gloo) and N GPUs on M nodes: the distributed
environment comes from torchrun, or from Slurm (via submitit), or is a single
local process. Checkpoints live outside the stage's output directory, so a
killed or requeued job resumes from the last one: model, optimizer, LR schedule,
data position and RNG state. SIGURG (Slurm's warning before the walltime), SIGUSR1 and
SIGTERM (preemption) save a checkpoint and stop.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def setup_distributed() -> tuple[int, int]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT unless a launcher did; returns (rank, world size)."""
    if "RANK" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            import submitit

            job = submitit.JobEnvironment()
            rank, world, local_rank = job.global_rank, job.num_tasks, job.local_rank
            master, port = job.hostnames[0], 20000 + int(job.job_id.split("_")[0]) % 20000
        else:
            rank, world, local_rank, master = 0, 1, 0, "127.0.0.1"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), MASTER_ADDR=master, MASTER_PORT=str(port)
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def deepspeed_config(tcfg: dict, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": tcfg["micro_batch_size"],
        "gradient_accumulation_steps": tcfg["grad_accum"],
        "train_batch_size": tcfg["micro_batch_size"] * tcfg["grad_accum"] * world,
        "gradient_clipping": tcfg["grad_clip"],
        "zero_optimization": {"stage": tcfg["zero_stage"]},
        "bf16": {"enabled": tcfg["precision"] == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(tcfg: dict) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < tcfg["warmup_steps"]:
            return (step + 1) / tcfg["warmup_steps"]
        progress = min(1.0, (step - tcfg["warmup_steps"]) / max(1, tcfg["steps"] - tcfg["warmup_steps"]))
        return tcfg["min_lr_ratio"] + (1 - tcfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def sample_indices(step: int, micro: int, rank: int, tcfg: dict, world: int, n_examples: int, seed: int) -> list[int]:
    """Which examples a micro-batch holds: a function of the step alone, so resuming restores the data position."""
    per_step = tcfg["micro_batch_size"] * tcfg["grad_accum"] * world
    first = step * per_step + (micro * world + rank) * tcfg["micro_batch_size"]
    indices = []
    for g in range(first, first + tcfg["micro_batch_size"]):
        epoch, position = divmod(g, n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        indices.append(int(order[position]))
    return indices


class StopRequested:
    """Remembers SIGURG/SIGUSR1/SIGTERM so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGURG, signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(
    model: torch.nn.Module,
    collate: Callable[[list[int]], dict],
    n_examples: int,
    validation_batches: list[dict],
    tcfg: dict,
    seed: int,
    checkpoint_dir: Path,
    tracker,
) -> tuple[dict, dict]:
    """Train `model` for tcfg["steps"] optimizer steps; returns the full fp32 state dict and metrics."""
    import deepspeed

    rank, world = setup_distributed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=tcfg["lr"], betas=(0.9, 0.95), weight_decay=tcfg["weight_decay"], fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tcfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg, world)
    )

    checkpoint_dir = Path(checkpoint_dir)
    start_step = 0
    if (checkpoint_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(checkpoint_dir))
        start_step = client["step"]
        _set_rng_state(client["rng"][rank])
        print(f"resumed from {checkpoint_dir} at step {start_step}", file=sys.stderr)

    def save(step: int) -> None:
        states = [None] * world
        torch.distributed.all_gather_object(states, _rng_state())
        engine.save_checkpoint(str(checkpoint_dir), tag=f"step{step}", client_state={"step": step, "rng": states})
        if rank == 0:  # keep only the newest checkpoint: quotas on shared filesystems are small
            for old in checkpoint_dir.glob("step*"):
                if old.name != f"step{step}":
                    shutil.rmtree(old, ignore_errors=True)

    def validation_loss() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [engine(**{k: v.to(device) for k, v in b.items()}).loss.item() for b in validation_batches]
        engine.train()
        return float(np.mean(losses))

    stop = StopRequested()
    engine.train()
    tokens_per_step = 0
    last_time, metrics = time.time(), {}
    for step in range(start_step, tcfg["steps"]):
        for micro in range(tcfg["grad_accum"]):
            batch = collate(sample_indices(step, micro, rank, tcfg, world, n_examples, seed))
            tokens_per_step = int((batch["labels"] != -100).sum()) * world * tcfg["grad_accum"]
            loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
        done = step + 1
        if done % 10 == 0 or done == tcfg["steps"]:
            elapsed, last_time = time.time() - last_time, time.time()
            logged = {"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            logged["tokens_per_second"] = tokens_per_step * (10 if done % 10 == 0 else done % 10) / elapsed
            tracker.log_metrics(logged, step=done)
            if rank == 0:
                print(f"step {done} " + " ".join(f"{k}={v:.4g}" for k, v in logged.items()), file=sys.stderr)
        if done % tcfg["eval_every"] == 0 or done == tcfg["steps"]:
            metrics["validation_loss"] = validation_loss()
            tracker.log_metrics({"validation_loss": metrics["validation_loss"]}, step=done)
        if stop.signal is not None or done % tcfg["checkpoint_every"] == 0 or done == tcfg["steps"]:
            save(done)
        if stop.signal is not None:
            sys.exit(f"{stop.signal} received: checkpoint saved at step {done} in {checkpoint_dir}; rerun to resume")

    metrics.update(train_loss=loss.item(), steps=tcfg["steps"])
    if tcfg["zero_stage"] == 3:  # parameters are sharded: rebuild the full weights from the last checkpoint
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        torch.distributed.barrier()
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=f"step{tcfg['steps']}")
    else:
        state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    return state, metrics
