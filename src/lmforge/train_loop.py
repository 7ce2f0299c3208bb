"""The DeepSpeed training loop shared by pretraining and fine-tuning.

One code path for 1 CPU process (gloo) and N GPUs on M nodes: the distributed
environment comes from torchrun, or from Slurm (via submitit), or is a single
local process. Checkpoints live outside the stage's output directory, so a
killed or requeued job resumes from the last one: model, optimizer, LR schedule,
data position and RNG state. SIGURG (Slurm's warning before the walltime), SIGUSR1 and
SIGTERM (preemption) save a checkpoint and stop; after SIGURG a Slurm batch job requeues
itself, so a training longer than the walltime goes on in the same job (requeue_slurm_job).
A checkpoint is complete once every rank has written it and rank 0 has recorded its file
sizes; only then is the previous one removed.
Resuming skips a newest checkpoint that is incomplete (the job was killed while saving it) or
whose files changed since, for the previous one. A rerun after the last step trains nothing
and exports the model from the final checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmforge.schema import TrainConfig
from lmforge.stage import StageError

log = logging.getLogger(__name__)


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
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process, before NCCL starts
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def deepspeed_config(tcfg: TrainConfig, world: int) -> dict:
    zero = {"stage": tcfg.zero_stage}
    if tcfg.offload in ("optimizer", "optimizer+parameters"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if tcfg.offload == "optimizer+parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world,
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": zero,
        # No per-parameter overflow check before each step: bf16 has fp32's range, so the check (small kernels
        # for every parameter and a host sync) finds only divergence, which skipping a step does not cure.
        "bf16": {"enabled": tcfg.precision == "bf16", "check_grad_overflow": False},
        # Offload steps torch's AdamW on the CPU copy; DeepSpeedCPUAdam would be faster but needs its C++ op built.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_model(model: torch.nn.Module, tcfg: TrainConfig) -> torch.nn.Module:
    """Options that change how the model computes, not what: attention kernel, recomputation, compilation."""
    model.set_attn_implementation(tcfg.attention)
    if tcfg.activation_checkpointing:  # recompute each layer's activations in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg.compile:  # in place, so state_dict keys stay those of the plain model
        model.compile()
    return model


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s per GPU; first match wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def peak_tflops(tcfg: TrainConfig, device: torch.device) -> float | None:
    if tcfg.peak_tflops is not None:
        return tcfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def matmul_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters outside the input embedding, which is a lookup, not a matrix product."""
    embedding = model.get_input_embeddings().weight
    counts = [0, 0]
    for p in model.parameters():
        if p is not embedding:
            counts[not p.requires_grad] += p.numel()
    return counts[0], counts[1]


def flops_per_token(trainable: int, frozen: int, model_config, seq_len: int) -> float:
    """Model FLOPs to train on one token (PaLM, appendix B); recomputation is not counted.

    Per weight of a matrix product: 2 forward, 2 for the input gradient and 2 for the weight gradient, which frozen
    weights (LoRA's base model) skip. Attention scores and values add 12 * layers * hidden * seq_len (forward and
    backward; the causal mask is not discounted).
    """
    attention = 12 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    return 6 * trainable + 4 * frozen + attention


def cosine_with_warmup(tcfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        progress = min(1.0, (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps))
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def sample_indices(step: int, micro: int, rank: int, tcfg: TrainConfig, world: int, n_examples: int, seed: int) -> list[int]:
    """Which examples a micro-batch holds: a function of the step alone, so resuming restores the data position."""
    per_step = tcfg.micro_batch_size * tcfg.grad_accum * world
    first = step * per_step + (micro * world + rank) * tcfg.micro_batch_size
    indices = []
    for g in range(first, first + tcfg.micro_batch_size):
        epoch, position = divmod(g, n_examples)
        indices.append(int(epoch_order(seed, epoch, n_examples)[position]))
    return indices


def mean_loss(micro_losses: list[torch.Tensor]) -> float:
    """A step's training loss: the mean over its micro-batches and over the ranks. Every rank calls it at the
    same steps (it is a collective)."""
    loss = torch.stack(micro_losses).mean()
    if torch.distributed.is_initialized():  # SUM: gloo (CPU) has no AVG
        torch.distributed.all_reduce(loss)
        loss /= torch.distributed.get_world_size()
    return loss.item()


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cuda":  # from pinned memory the copy is asynchronous: the host does not wait for the GPU
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


LOG_EVERY = 10  # steps between log lines; logging reads the loss, which waits for the GPU


class StopRequested:
    """Remembers SIGURG/SIGUSR1/SIGTERM so that every rank checkpoints and stops at the same step boundary.

    Slurm signals all tasks, but each may get it during a different step; a rank that stopped alone would
    leave the others waiting in a collective. So the ranks agree each step, over a gloo group: a CPU
    all-reduce of one integer, which does not wait for the GPU.
    """

    # In rising precedence: a preemption or `scancel` (SIGTERM) during the walltime warning must not requeue.
    SIGNALS = (signal.SIGURG, signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received = 0  # 1 + the index in SIGNALS of the strongest signal this rank got; 0: none
        self.group = torch.distributed.new_group(backend="gloo")
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        # lmforge.launch blocked SIGURG so that a warning during start-up waits for this handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGURG})

    def _handle(self, signum, frame):
        self.received = max(self.received, 1 + self.SIGNALS.index(signum))

    def agreed(self) -> str | None:
        """The name of the strongest signal any rank has received; None when none has."""
        flag = torch.tensor([self.received], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return self.SIGNALS[flag.item() - 1].name if flag.item() else None


REQUEUED = "requeued.json"  # in the checkpoint directory: the Slurm job that last requeued itself, and at which step


def requeue_slurm_job(step: int, checkpoint_dir: Path) -> str:
    """Put this Slurm batch job back in the queue to resume from the checkpoint of `step`; says what happened.

    Slurm's `--requeue` acts on node failure and preemption, not on a job's own exit, so the job asks for it:
    Slurm runs the same job id again, the rule's command resumes, and Snakemake, polling that id, waits on.
    A job that has not got past the step where it last requeued itself (it did not resume from the checkpoint
    it left) would loop forever: it is not requeued again.
    """
    job = os.environ["SLURM_JOB_ID"]
    record = checkpoint_dir / REQUEUED
    previous = json.loads(record.read_text()) if record.exists() else {}
    if previous.get("job") != job:  # a record of an earlier run's job
        previous = {}
    if previous and previous["step"] >= step:
        return (
            f"not requeued: Slurm job {job} requeued itself at step {previous['step']} before and has not trained "
            f"past it since (is {checkpoint_dir} on a filesystem every node sees?); rerun to resume"
        )
    requeues = previous.get("requeues", 0) + 1
    record.write_text(json.dumps({"job": job, "step": step, "requeues": requeues}) + "\n")
    try:
        requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot requeue Slurm job {job} ({error}); rerun to resume"
    if requeue.returncode != 0:
        return f"`scontrol requeue {job}` failed ({requeue.stderr.strip()}); rerun to resume"
    return f"requeued Slurm job {job} (requeue {requeues}) to resume from step {step}"


def how_training_resumes(stopped_by: str, step: int, checkpoint_dir: Path, rank: int, group) -> str:
    """After the stop's checkpoint: a Slurm job warned of its walltime requeues itself; otherwise, rerun."""
    if stopped_by != "SIGURG" or "SLURM_JOB_ID" not in os.environ:
        return "rerun to resume"
    outcome = [requeue_slurm_job(step, checkpoint_dir) if rank == 0 else None]
    # Also holds the other ranks until the job is requeued: a task exiting first could end the job as FAILED.
    torch.distributed.broadcast_object_list(outcome, src=0, group=group)
    return outcome[0]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


COMPLETE = "complete.json"  # in a checkpoint, written last: the size of each of its files


def checkpoint_step(directory: Path) -> int:
    return int(directory.name.removeprefix("step"))


def mark_complete(directory: Path) -> None:
    """Record the checkpoint's file sizes, so that a file missing or truncated later is noticed before loading."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    partial = directory / f"{COMPLETE}.partial"
    partial.write_text(json.dumps(sizes, indent=2) + "\n")
    partial.replace(directory / COMPLETE)  # atomic: a half-written record never marks a checkpoint complete


INCOMPLETE = f"incomplete (no {COMPLETE}: the job stopped while saving it)"


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be resumed from; None when it is complete and unchanged."""
    if not (directory / COMPLETE).exists():
        return INCOMPLETE
    for name, size in json.loads((directory / COMPLETE).read_text()).items():
        path = directory / name
        if not path.is_file():
            return f"corrupt: {name} is missing"
        if path.stat().st_size != size:
            return f"corrupt: {name} has {path.stat().st_size} bytes, {size} when saved"
    return None


def resumable_checkpoint(checkpoint_dir: Path, report: bool) -> str | None:
    """The tag of the newest complete checkpoint; None when there is none and no corrupt one either.

    Every rank decides alike from the shared filesystem; `report` prints why newer ones are skipped.
    """
    checkpoints = sorted(checkpoint_dir.glob("step*"), key=checkpoint_step, reverse=True)
    problems = []
    for directory in checkpoints:
        problem = checkpoint_problem(directory)
        if problem is None:
            if problems and report:
                log.warning(f"falling back to the previous checkpoint, {directory}")
            return directory.name
        problems.append(f"{directory} is {problem}")
        if report:
            log.warning(f"skipping checkpoint {problems[-1]}")
    if any(checkpoint_problem(directory) != INCOMPLETE for directory in checkpoints):
        raise StageError(
            f"no checkpoint in {checkpoint_dir} can be resumed from: {'; '.join(problems)}. "
            f"Delete {checkpoint_dir} to train this stage from scratch."
        )
    if checkpoints and report:  # killed during its first save: nothing was complete, so nothing is lost
        log.warning("no complete checkpoint: training from the start")
    return None


def remove_checkpoints_except(checkpoint_dir: Path, tag: str | None) -> None:
    for old in checkpoint_dir.glob("step*"):
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def train(
    model: torch.nn.Module,
    collate: Callable[[list[int]], dict],
    n_examples: int,
    validation_batches: list[dict],
    tcfg: TrainConfig,
    seed: int,
    checkpoint_dir: Path,
    tracker,
) -> tuple[dict, dict]:
    """Train `model` for tcfg.steps optimizer steps; returns the full fp32 state dict and metrics."""
    import deepspeed

    rank, world = setup_distributed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    stop = StopRequested()  # before building the engine and loading the checkpoint: a signal then is not lost
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    model = prepare_model(model, tcfg)
    parameter_counts = matmul_parameters(model)  # before ZeRO-3 partitions them
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=tcfg.lr,
        betas=(0.9, 0.95),
        weight_decay=tcfg.weight_decay,
        fused=device.type == "cuda" and tcfg.offload == "none",  # one kernel for all parameters
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tcfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg, world)
    )
    peak = peak_tflops(tcfg, device)

    checkpoint_dir = Path(checkpoint_dir)
    # The metrics so far travel in each checkpoint: a rerun after the last step (its output directory removed)
    # then reports the train and validation loss of the run that trained the model, the same as the first time.
    start_step, metrics = 0, {}
    tag = resumable_checkpoint(checkpoint_dir, report=rank == 0)
    torch.distributed.barrier()  # every rank has chosen before rank 0 removes the newer, broken checkpoints
    if rank == 0:  # their steps are trained again; keeping them would mix old files into new checkpoints
        remove_checkpoints_except(checkpoint_dir, tag)
    if tag is not None:
        try:
            _, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        except Exception as error:  # the sizes match, the contents do not load
            raise StageError(
                f"cannot load checkpoint {checkpoint_dir / tag} ({type(error).__name__}: {error}). "
                f"Delete {checkpoint_dir} to train this stage from scratch."
            ) from error
        start_step, metrics = client["step"], client["metrics"]
        _set_rng_state(client["rng"][rank])
        log.info(f"resumed from {checkpoint_dir} at step {start_step} of {tcfg.steps}")

    def save(step: int) -> None:
        states = [None] * world
        torch.distributed.all_gather_object(states, _rng_state())
        client = {"step": step, "rng": states, "metrics": metrics}
        engine.save_checkpoint(str(checkpoint_dir), tag=f"step{step}", client_state=client)
        torch.distributed.barrier()  # every rank has written its files
        if rank == 0:  # only now may the previous checkpoint go: quotas on shared filesystems are small
            mark_complete(checkpoint_dir / f"step{step}")
            remove_checkpoints_except(checkpoint_dir, f"step{step}")

    def validation_loss() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [engine(**to_device(b, device)).loss.item() for b in validation_batches]
        engine.train()
        return float(np.mean(losses))

    engine.train()
    # Since the last log line, on this rank: tokens with a loss, tokens through the model, and the model FLOPs.
    trained_tokens = seen_tokens = flops = 0
    last_time = time.perf_counter()
    attempt_started = time.perf_counter()
    for step in range(start_step, tcfg.steps):
        micro_losses = []
        for micro in range(tcfg.grad_accum):
            batch = collate(sample_indices(step, micro, rank, tcfg, world, n_examples, seed))
            trained_tokens += int((batch["labels"] != -100).sum())
            seen_tokens += batch["input_ids"].numel()
            seq_len = batch["input_ids"].shape[1]
            flops += flops_per_token(*parameter_counts, model.config, seq_len) * batch["input_ids"].numel()
            loss = engine(**to_device(batch, device)).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach())
        done = step + 1
        if done % LOG_EVERY == 0 or done == tcfg.steps:
            logged = {"train_loss": mean_loss(micro_losses), "lr": scheduler.get_last_lr()[0]}  # waits for the GPU
            elapsed, last_time = time.perf_counter() - last_time, time.perf_counter()
            logged["tokens_per_second"] = trained_tokens * world / elapsed
            logged["tokens_per_second_per_device"] = seen_tokens / elapsed
            if peak is not None:  # model FLOPs utilization: achieved model FLOP/s over the device's bf16 peak
                logged["mfu"] = flops / elapsed / (peak * 1e12)
            trained_tokens = seen_tokens = flops = 0
            tracker.log_metrics(logged, step=done)
            if rank == 0:
                took = time.perf_counter() - attempt_started
                eta = took / (done - start_step) * (tcfg.steps - done)  # this job's pace, evaluations included
                values = " ".join(f"{k}={v:.4g}" for k, v in logged.items())
                log.info(f"step {done}/{tcfg.steps} {values} eta={eta / 60:.1f}min")
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            metrics["validation_loss"] = validation_loss()
            tracker.log_metrics({"validation_loss": metrics["validation_loss"]}, step=done)
        stopped_by = stop.agreed()
        if stopped_by or done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
            metrics["train_loss"] = mean_loss(micro_losses)
            save(done)
        if stopped_by:
            resumes = how_training_resumes(stopped_by, done, checkpoint_dir, rank, stop.group)
            sys.exit(f"{stopped_by} received: checkpoint saved at step {done} in {checkpoint_dir}; {resumes}")
        if done % tcfg.eval_every == 0 or done % tcfg.checkpoint_every == 0:
            last_time = time.perf_counter()  # throughput counts training steps, not evaluation or checkpoints

    metrics["steps"] = tcfg.steps
    if tcfg.zero_stage == 3:  # parameters are sharded: rebuild the full weights from the last checkpoint
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        torch.distributed.barrier()
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=f"step{tcfg.steps}")
    else:
        state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    return state, metrics
