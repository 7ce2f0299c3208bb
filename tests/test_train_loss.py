"""The logged train_loss of a step: the mean over its micro-batches and over the ranks."""

import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing

from lmforge import train_loop

# Two ranks, two micro-batches each, all with different losses: the step's loss is the mean of the four.
RANK_LOSSES = [[2.0, 4.0], [6.0, 12.0]]


def rank_mean_loss(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(RANK_LOSSES))
    try:
        results[rank] = train_loop.mean_loss([torch.tensor(loss) for loss in RANK_LOSSES[rank]])
    finally:
        torch.distributed.destroy_process_group()


def test_a_single_process_step_loss_is_the_mean_over_its_micro_batches():
    assert train_loop.mean_loss([torch.tensor(2.0), torch.tensor(4.0)]) == pytest.approx(3.0)  # not the last, 4


def test_every_rank_logs_the_mean_over_all_ranks_micro_batches():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = torch.multiprocessing.Manager().dict()
    # fork: the ranks start with torch already imported
    torch.multiprocessing.start_processes(
        rank_mean_loss, args=(port, results), nprocs=len(RANK_LOSSES), start_method="fork"
    )
    assert dict(results) == {0: pytest.approx(6.0), 1: pytest.approx(6.0)}  # (2 + 4 + 6 + 12) / 4
