"""DeepSpeed training on CPU (gloo): every ZeRO stage and method, 1 and 2 processes, and exact resume."""

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import config, finetune, pretrain, train_loop, workflow
from lmforge import plan as planning
from tests.stages import TINY, plan, run_stage, small_corpus, stage_command


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Curated data and a tokenizer for the tiny runs, made by the real stages."""
    root = tmp_path_factory.mktemp("training")
    corpus = small_corpus(root / "corpus")
    base = [f"data.source={corpus}", *TINY]
    stages = plan(root / "results", base)
    run_stage(stages["curate"])
    run_stage(stages["tokenizer"])
    return root, base


def weights(stage) -> dict:
    return load_file(f"{stage.dir}/model/model.safetensors")


def metrics(stage) -> dict:
    return json.loads(Path(stage.dir, "manifest.json").read_text())["metrics"]


@pytest.mark.parametrize("processes", [1, 2])
def test_pretraining_agrees_across_zero_stages(prepared, processes):
    root, base = prepared
    losses = {}
    for zero in (0, 1, 2, 3):
        stages = plan(root / "results", [*base, f"train.zero_stage={zero}", f"train.processes={processes}"])
        run_stage(stages["pretrain"], processes=processes)
        losses[zero] = metrics(stages["pretrain"])["validation_loss"]
        assert set(weights(stages["pretrain"])) >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert max(losses.values()) - min(losses.values()) < 1e-3, losses


@pytest.mark.parametrize(
    "method,processes,zero",
    [("full", 1, 2), ("lora", 1, 2), ("full", 2, 2), ("lora", 2, 2), ("full", 2, 3), ("lora", 2, 3)],
)
def test_finetuning_methods_export_a_plain_model(prepared, method, processes, zero):
    root, base = prepared
    stages = plan(
        root / "results",
        [*base, f"finetune={method}", f"finetune.train.processes={processes}", f"finetune.train.zero_stage={zero}"],
    )
    if not Path(stages["pretrain"].dir).exists():
        run_stage(stages["pretrain"])
    run_stage(stages["finetune"], processes=processes)
    tuned, pretrained = weights(stages["finetune"]), weights(stages["pretrain"])
    assert not any("lora" in name for name in tuned)  # adapters merged away
    assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in pretrained.items()}  # not ZeRO shards
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned)


# A template unlike the pipeline's ChatML: fine-tuning must use the base model's own template and end of turn.
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_finetuning_any_local_hugging_face_model(prepared, tmp_path):
    """`finetune.base` = a model directory from elsewhere: its tokenizer and chat template are the ones used."""
    root, base = prepared
    stages = plan(root / "results", base)
    if not Path(stages["pretrain"].dir).exists():
        run_stage(stages["pretrain"])
    model = AutoModelForCausalLM.from_pretrained(f"{stages['pretrain'].dir}/model")
    tokenizer = AutoTokenizer.from_pretrained(f"{stages['pretrain'].dir}/model")
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    model.save_pretrained(tmp_path / "other-model")
    tokenizer.save_pretrained(tmp_path / "other-model")

    stages = plan(root / "results", [*base, f"finetune.base={tmp_path / 'other-model'}", "finetune=lora"])
    run_stage(stages["finetune"])
    tuned = AutoTokenizer.from_pretrained(f"{stages['finetune'].dir}/model")
    assert tuned.chat_template == ZEPHYR_TEMPLATE
    prompt, answer = finetune.chat_texts(tuned, {"docstring": "Add two numbers.", "name": "add"})
    assert prompt.endswith("<|assistant|>\n") and answer == "add<|endoftext|>\n"
    assert finetune.end_of_turn_ids(tuned) == [tuned.eos_token_id]


@pytest.mark.parametrize("processes,zero", [(1, 0), (2, 3)])
def test_interrupted_training_resumes_to_identical_weights(prepared, processes, zero):
    root, base = prepared
    overrides = ["train.steps=60", "train.checkpoint_every=5", "train.eval_every=30"]
    stage = plan(root / "results", [*base, *overrides, f"train.processes={processes}", f"train.zero_stage={zero}"])[
        "pretrain"
    ]
    checkpoints = Path(stage.config["run"]["checkpoint_dir"])
    run_stage(stage, processes)
    uninterrupted = weights(stage)
    shutil.rmtree(stage.dir)
    shutil.rmtree(checkpoints)

    job = subprocess.Popen(stage_command(stage, processes), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (checkpoints / "latest").exists() and time.time() < deadline:
        time.sleep(0.01)
    # What Slurm sends before the walltime. With torchrun, only the last rank gets it: the ranks must still
    # agree to stop at the same step, as when Slurm's signal reaches its tasks during different steps.
    ranks = psutil.Process(job.pid).children() if processes > 1 else [psutil.Process(job.pid)]
    ranks[-1].send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and "SIGUSR1 received" in err, err[-2000:]
    assert not Path(stage.dir).exists()

    run = run_stage(stage, processes)  # the resubmitted job
    assert "resumed from" in run.stderr
    resumed = weights(stage)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_bf16_training_with_zero2_and_two_processes(prepared):
    root, base = prepared
    stages = plan(root / "results", [*base, "train.precision=bf16", "train.zero_stage=2", "train.processes=2"])
    run_stage(stages["pretrain"], processes=2)
    assert all(t.dtype == torch.float32 for t in weights(stages["pretrain"]).values())  # exported in full precision
    assert metrics(stages["pretrain"])["validation_loss"] < 6.3  # below uniform over 512 tokens: it learned


@pytest.mark.parametrize(
    "options",
    [
        [
            "train.activation_checkpointing=true",
            "train.attention=eager",
            "train.zero_stage=2",
            "train.offload=optimizer",
        ],
        ["train.zero_stage=3", "train.offload=optimizer+parameters"],
    ],
    ids=["checkpointing-eager-offload_optimizer", "zero3-offload_all"],
)
def test_memory_saving_options_train_the_same_model(prepared, options):
    root, base = prepared
    plain = plan(root / "results", base)["pretrain"]
    if not Path(plain.dir).exists():
        run_stage(plain)
    stage = plan(root / "results", [*base, *options])["pretrain"]
    run_stage(stage)
    assert abs(metrics(stage)["validation_loss"] - metrics(plain)["validation_loss"]) < 1e-3


def test_compiling_keeps_the_plain_model_state_dict():
    """Compilation happens in place, so checkpoints and the export keep plain keys (no "_orig_mod." prefix).

    Running a compiled model takes minutes on 2 CPU cores: the GPU benchmark runs it (train=gpu has compile=true).
    """
    cfg = config.load([*TINY, "train.compile=true"])
    model = pretrain.build_model(dict(cfg.model), 64, {})
    keys = set(model.state_dict())
    compiled = train_loop.prepare_model(model, dict(cfg.train))
    assert compiled is model and set(compiled.state_dict()) == keys
    assert model._compiled_call_impl is not None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.offload=optimizer"], "needs 'train.zero_stage' >= 1"),
        (["finetune.train.zero_stage=2", "finetune.train.offload=optimizer+parameters"], ">= 3"),
        (["train.compile=true", "train.zero_stage=3"], "not supported with ZeRO-3"),
        (["train.precision=fp16"], "must be one of fp32, bf16"),
    ],
)
def test_training_options_that_cannot_run_fail_at_planning(overrides, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(overrides)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["resources.pretrain.gpus=1"], {"gpu": 1, "nodes": 1, "tasks": None, "tasks_per_gpu": None}),
        (["resources.pretrain.gpus=2", "train.processes=2"], {"gpu": 2, "nodes": 1, "tasks": 2, "tasks_per_gpu": 1}),
        (
            ["resources.pretrain.gpus=4", "resources.pretrain.nodes=2", "train.processes=8"],
            {"gpu": 8, "nodes": 2, "tasks": 8, "tasks_per_gpu": 1},
        ),
    ],
)
def test_training_jobs_ask_slurm_for_one_task_per_gpu(overrides, expected):
    """`gpus` is per node: the job asks for gpus x nodes GPUs (--gpus) and one task on each (--ntasks-per-gpu=1)."""
    stage = planning.stages(config.load(overrides))["pretrain"]
    requested = workflow.slurm_resources(stage)
    assert {key: requested.get(key) for key in expected} == expected


def test_gpus_and_processes_must_agree():
    with pytest.raises(config.ConfigError, match="one process per GPU"):
        config.load(["resources.pretrain.gpus=2", "resources.pretrain.nodes=2", "train.processes=2"])
