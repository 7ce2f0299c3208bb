"""The training loop's pure parts: learning-rate schedule, model FLOPs, and which examples each step reads."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge import schema, train_loop

TRAIN = schema.TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, micro_batch_size=4, grad_accum=2)


def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_its_floor():
    factor = train_loop.cosine_with_warmup(TRAIN)
    assert [factor(step) for step in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert factor(100) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    decay = [factor(step) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_flops_per_token_count_six_per_trained_weight_four_per_frozen_and_attention():
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(cfg)
    trainable, frozen = train_loop.matmul_parameters(model)
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # q, k, v, o; gate, up, down; two norms
    assert (trainable, frozen) == (2 * layer + 32 + 100 * 32, 0)  # + the final norm and the output layer
    attention = 12 * 2 * 32 * 128
    assert train_loop.flops_per_token(trainable, frozen, cfg, 128) == 6 * trainable + attention
    for p in model.model.layers.parameters():  # LoRA's case: a frozen base skips the weight gradients
        p.requires_grad_(False)
    trainable, frozen = train_loop.matmul_parameters(model)
    assert frozen == 2 * layer
    assert train_loop.flops_per_token(trainable, frozen, cfg, 128) == 6 * trainable + 4 * frozen + attention


@pytest.mark.parametrize("world", [1, 2])
def test_each_epoch_reads_every_example_once_across_ranks_and_micro_batches(world):
    n_examples, seed = 48, 7
    per_step = TRAIN.micro_batch_size * TRAIN.grad_accum * world
    steps_per_epoch = n_examples // per_step

    def read(step):
        return [
            i
            for micro in range(TRAIN.grad_accum)
            for rank in range(world)
            for i in train_loop.sample_indices(step, micro, rank, TRAIN, world, n_examples, seed)
        ]

    first_epoch = [i for step in range(steps_per_epoch) for i in read(step)]
    second_epoch = [i for step in range(steps_per_epoch, 2 * steps_per_epoch) for i in read(step)]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(n_examples))
    assert first_epoch != second_epoch  # reshuffled each epoch
    assert read(3) == read(3)  # a function of the step: a resumed run reads what the first run would have


def test_data_order_depends_on_the_seed():
    order = [train_loop.sample_indices(0, 0, 0, TRAIN, 1, 1000, seed) for seed in (1, 2)]
    assert order[0] != order[1]
