"""Stage 6, quantization: post-training int8 weight-only quantization of the fine-tuned model with torchao.

Runs on CPU and GPU; the quantized model saves and reloads through save_pretrained (the quantization
config travels in config.json, so `AutoModelForCausalLM.from_pretrained` restores it with torchao installed).

Outputs: model/ (the quantized model with its tokenizer), metrics.json (sizes before and after).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

from lmforge import stage


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))


def main(cfg: dict, out: Path, tracker) -> dict:
    source = Path(cfg["inputs"]["finetune"]) / "model"
    method = cfg["quantize"]["method"]
    if method == "none":
        shutil.copytree(source, out / "model")
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        )
        model.save_pretrained(out / "model", safe_serialization=False)
        AutoTokenizer.from_pretrained(source).save_pretrained(out / "model")
    before, after = weights_bytes(source), weights_bytes(out / "model")
    metrics = {"method": method, "bytes_before": before, "bytes_after": after, "compression": before / after}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {k: v for k, v in metrics.items() if k != "method"}


if __name__ == "__main__":
    stage.run(main)
