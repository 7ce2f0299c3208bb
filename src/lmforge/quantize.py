"""Stage 6, quantization: post-training int8 weight-only quantization of the fine-tuned model with torchao
(of the pretrained model with `finetune=none`).

Runs on CPU and GPU; the quantized model saves and reloads through save_pretrained (the quantization
config travels in config.json, so `AutoModelForCausalLM.from_pretrained` restores it with torchao installed).

Outputs: model/ (the quantized model with its tokenizer); the manifest's metrics hold the sizes before and after.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

from lmforge import finetune, pretrain, stage
from lmforge.schema import StageConfig


def model_dir(stage_dir: str) -> str:
    """The quantized model (loads with transformers when torchao is installed), with the tokenizer."""
    return f"{stage_dir}/model"


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    inputs = cfg.inputs
    source = Path(
        finetune.model_dir(inputs["finetune"]) if "finetune" in inputs else pretrain.model_dir(inputs["pretrain"])
    )
    method = cfg.quantize.method
    if method == "none":
        shutil.copytree(source, model_dir(out))
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        )
        model.save_pretrained(model_dir(out), safe_serialization=False)
        AutoTokenizer.from_pretrained(source).save_pretrained(model_dir(out))
    before, after = weights_bytes(source), weights_bytes(Path(model_dir(out)))
    return {"bytes_before": before, "bytes_after": after, "compression": before / after}


if __name__ == "__main__":
    stage.run(main)
