"""QLoRA fine-tuning (LoRA on a 4-bit NF4 base, bitsandbytes) exports a plain merged model. Needs a CUDA GPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmforge import finetune, pretrain, stage
from tests.stages import curated_and_tokenized, plan, run_stage

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (bitsandbytes' NF4 base); this machine has none"
)

RANK = 4  # below the tiny model's widths (32 and 64), so that a merged adapter's low rank shows


def test_qlora_exports_the_unquantized_base_plus_merged_low_rank_adapters(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the bitsandbytes package")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the stages run on the GPU, not on the CPU conftest pins
    prepared = curated_and_tokenized(tmp_path)
    qlora = ["finetune=qlora", "resources.finetune.gpus=1", f"finetune.lora.r={RANK}"]
    stages = plan(tmp_path / "results", [*prepared, *qlora])
    run_stage(stages["pretrain"])
    run_stage(stages["finetune"])

    exported = Path(finetune.model_dir(stages["finetune"].dir))
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a 4-bit one
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"

    tuned = load_file(exported / "model.safetensors")
    pretrained = load_file(Path(pretrain.model_dir(stages["pretrain"].dir), "model.safetensors"))
    assert not [name for name in tuned if "lora" in name]  # adapters merged away
    assert {k: (v.shape, v.dtype) for k, v in tuned.items()} == {k: (v.shape, v.dtype) for k, v in pretrained.items()}
    lora_modules = stages["finetune"].config["finetune"]["lora"]["target_modules"]
    targets = {name for name in tuned if name.rsplit(".", 2)[-2] in lora_modules}  # model.layers.0.mlp.up_proj.weight
    assert len(targets) == 7 * config["num_hidden_layers"]
    for name, weight in tuned.items():
        if name not in targets:  # embeddings, norms, lm_head: frozen
            assert torch.equal(weight, pretrained[name]), name
            continue
        # Merged into the unquantized fp32 base, the change is the adapter's product B·A: rank at most RANK.
        # Merged into a dequantized NF4 base it would carry the 4-bit rounding error, which is of full rank.
        singular = torch.linalg.svdvals(weight.double() - pretrained[name].double())
        assert singular[0] > 0, f"{name} did not change"
        assert (singular > 1e-3 * singular[0]).sum() <= RANK, (name, singular[: RANK + 2])

    adapters = RANK * sum(sum(tuned[name].shape) for name in targets)  # A: RANK x inputs, B: outputs x RANK
    assert stage.metrics(stages["finetune"].dir)["trainable_parameters"] == adapters
