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
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import chat, config, pretrain, tokenizer, train_loop, workflow
from lmforge import plan as planning
from tests.stages import TINY, curated_and_tokenized, plan, run_stage, stage_command


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Curated data and a tokenizer for the tiny runs, made by the real stages."""
    root = tmp_path_factory.mktemp("training")
    return root, curated_and_tokenized(root)


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
    *prompt, (answer, trained) = chat.pieces(tuned, chat.conversation("Add two numbers.", "add"))
    assert "".join(text for text, _ in prompt).endswith("<|assistant|>\n") and answer == "add<|endoftext|>\n" and trained
    assert chat.end_of_turn_ids(tuned) == [tuned.eos_token_id]


LONG_RUN = ["train.steps=60", "train.checkpoint_every=5", "train.eval_every=30"]  # long enough to stop mid-run

# Damage to a checkpoint file: one its recorded size reveals, and one only loading it does.
CORRUPTIONS = {"truncated": lambda data: data[: len(data) // 2], "overwritten": lambda data: bytes(len(data))}


def long_pretraining(prepared, processes: int = 1, zero: int = 0):
    root, base = prepared
    overrides = [*base, *LONG_RUN, f"train.processes={processes}", f"train.zero_stage={zero}"]
    return plan(root / "results", overrides)["pretrain"]


def checkpoint_dir(stage) -> Path:
    return Path(stage.config["run"]["checkpoint_dir"])


def preempt(stage, processes: int, stop_signal: signal.Signals) -> None:
    """Train the stage from scratch and send `stop_signal` once its first checkpoint is complete: it must stop."""
    checkpoints = checkpoint_dir(stage)
    shutil.rmtree(stage.dir, ignore_errors=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    job = subprocess.Popen(stage_command(stage, processes), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(checkpoints.glob(f"step*/{train_loop.COMPLETE}")) and time.time() < deadline:
        time.sleep(0.01)
    # With torchrun, only the last rank gets the signal: the ranks must still agree to stop at the same step,
    # as when Slurm's signal reaches its tasks during different steps.
    ranks = psutil.Process(job.pid).children() if processes > 1 else [psutil.Process(job.pid)]
    ranks[-1].send_signal(stop_signal)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and f"{stop_signal.name} received" in err, err[-2000:]
    assert not Path(stage.dir).exists()


@pytest.mark.parametrize(
    "processes,zero,stop_signal",
    [(1, 0, signal.SIGTERM), (2, 3, signal.SIGUSR1)],
    ids=["preempted", "walltime-zero3-2-processes"],  # Slurm sends SIGTERM to preempt, SIGUSR1 before the walltime
)
def test_interrupted_training_resumes_to_identical_weights(prepared, processes, zero, stop_signal):
    stage = long_pretraining(prepared, processes, zero)
    shutil.rmtree(checkpoint_dir(stage), ignore_errors=True)
    run_stage(stage, processes)
    uninterrupted = weights(stage)

    preempt(stage, processes, stop_signal)
    run = run_stage(stage, processes)  # the resubmitted job
    assert "resumed from" in run.stderr
    resumed = weights(stage)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_rerunning_a_finished_training_stage_exports_the_same_model(prepared, tmp_path, name):
    """Its output directory moved away, the stage resumes its final checkpoint, trains no steps and exports."""
    root, base = prepared
    stages = plan(root / "results", base)
    for needed in ("pretrain", name):
        if not Path(stages[needed].dir).exists():
            run_stage(stages[needed])
    stage = stages[name]
    first = Path(shutil.move(stage.dir, tmp_path / "first"))

    run = run_stage(stage)
    assert "at step 6 of 6" in run.stderr  # TINY's last step
    first_weights = load_file(first / "model" / "model.safetensors")
    assert all(torch.equal(first_weights[k], v) for k, v in weights(stage).items())
    first_metrics = json.loads((first / "manifest.json").read_text())["metrics"]
    assert {k: metrics(stage)[k] for k in ("train_loss", "validation_loss")} == {
        k: first_metrics[k] for k in ("train_loss", "validation_loss")
    }


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(prepared):
    stage = long_pretraining(prepared)
    if not Path(stage.dir).exists():
        run_stage(stage)
    reference = weights(stage)
    preempt(stage, 1, signal.SIGTERM)
    checkpoints = checkpoint_dir(stage)
    (previous,) = checkpoints.glob("step*")
    # As if the job had been killed after completing its last checkpoint, before removing the previous one,
    # and a file of the newest had been truncated since.
    newest = checkpoints / "step60"
    shutil.copytree(previous, newest)
    model_states = newest / "mp_rank_00_model_states.pt"
    model_states.write_bytes(CORRUPTIONS["truncated"](model_states.read_bytes()))

    run = run_stage(stage)
    assert f"skipping checkpoint {newest} is corrupt: mp_rank_00_model_states.pt has" in run.stderr
    assert f"falling back to the previous checkpoint, {previous}" in run.stderr
    assert f"resumed from {checkpoints} at step {train_loop.checkpoint_step(previous)} of 60" in run.stderr
    resumed = weights(stage)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert list(checkpoints.glob("step*")) == [newest] and train_loop.checkpoint_problem(newest) is None


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_only_checkpoint_stops_with_its_path(prepared, tmp_path, corruption):
    root, base = prepared
    stage = plan(root / "results", base)["pretrain"]
    if not Path(stage.dir).exists():
        run_stage(stage)
    # A copy of its final checkpoint, so that the stage's own stays intact for the other tests.
    checkpoints = Path(shutil.copytree(checkpoint_dir(stage), tmp_path / "checkpoints"))
    stage.config["run"]["checkpoint_dir"] = str(checkpoints)
    model_states = checkpoints / "step6" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(CORRUPTIONS[corruption](model_states.read_bytes()))

    run = subprocess.run(stage_command(stage), capture_output=True, text=True)
    assert run.returncode != 0
    assert str(checkpoints / "step6") in run.stderr, run.stderr[-2000:]
    assert f"Delete {checkpoints} to train this stage from scratch." in run.stderr


def test_a_job_killed_during_its_first_save_starts_again(prepared, tmp_path):
    """An incomplete checkpoint and no complete one: nothing was lost, so the stage trains from the start."""
    root, base = prepared
    stage = plan(root / "results", base)["pretrain"]
    if not Path(stage.dir).exists():
        run_stage(stage)
    reference = weights(stage)
    checkpoints = Path(shutil.copytree(checkpoint_dir(stage), tmp_path / "checkpoints"))
    (checkpoints / "step6" / train_loop.COMPLETE).unlink()  # killed before every rank had written its files
    stage.config["run"]["checkpoint_dir"] = str(checkpoints)
    shutil.rmtree(stage.dir)

    run = run_stage(stage)
    assert "no complete checkpoint: training from the start" in run.stderr and "resumed from" not in run.stderr
    assert all(torch.equal(reference[k], v) for k, v in weights(stage).items())


def validation_loss(model, stage) -> float:
    """The loss of `model` on the first validation blocks of the stage's tokenizer."""
    tokens = tokenizer.tokens(stage.config["inputs"]["tokenizer"], "validation")
    batch = pretrain.block_batch(pretrain.Blocks(tokens, stage.config["model"]["max_seq_len"]), list(range(8)))
    with torch.no_grad():
        return model(**batch).loss.item()


def test_bf16_training_with_zero2_and_two_processes(prepared):
    root, base = prepared
    overrides = [*base, "train.precision=bf16", "train.zero_stage=2", "train.processes=2"]
    stage = plan(root / "results", overrides)["pretrain"]
    run_stage(stage, processes=2)
    assert all(t.dtype == torch.float32 for t in weights(stage).values())  # exported in full precision
    trained = AutoModelForCausalLM.from_pretrained(f"{stage.dir}/model").eval()
    torch.manual_seed(stage.config["seed"])
    untrained = AutoModelForCausalLM.from_config(trained.config).eval()  # a fresh model, as training starts from
    # Its 6 steps take about 0.16 nats off the untrained model's loss (ln 512 = 6.24): the export learned.
    assert validation_loss(trained, stage) < validation_loss(untrained, stage) - 0.1


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
    model = pretrain.build_model(OmegaConf.to_object(cfg.model), 64, {})
    keys = set(model.state_dict())
    compiled = train_loop.prepare_model(model, OmegaConf.to_object(cfg.train))
    assert compiled is model and set(compiled.state_dict()) == keys
    assert model._compiled_call_impl is not None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.offload=optimizer"], "needs 'train.zero_stage' >= 1"),
        (["finetune.train.zero_stage=2", "finetune.train.offload=optimizer+parameters"], ">= 3"),
        (["train.compile=true", "train.zero_stage=3"], "not supported with ZeRO-3"),
        (["train.precision=fp16"], "must be one of fp32, bf16"),
        (["resources.pretrain.runtime=1"], "'resources.pretrain.signal_before_end_s=120' leaves less than half"),
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
