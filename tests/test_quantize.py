"""The quantize stage on a small model: int8 linear weights, a smaller weights file, nearly the same logits."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torchao.quantization import Int8Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmforge import finetune, quantize, stage
from tests.stages import TINY, plan, run_stage

VOCAB = 96
# Linear layers much larger than the embeddings, so that the int8 part shows in the file's size.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def write_finetuned_model(model_dir: Path) -> LlamaForCausalLM:
    """A random Llama and a word-level tokenizer where the quantize stage reads the fine-tuned model."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, **SHAPE)).eval()
    model.save_pretrained(model_dir)
    words = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(model_dir)
    return model


def test_int8_weights_are_smaller_and_predict_nearly_the_same(tmp_path):
    planned = plan(tmp_path / "results", TINY)["quantize"]
    source, output = (
        Path(finetune.model_dir(planned.config["inputs"]["finetune"])),
        Path(quantize.model_dir(planned.dir)),
    )
    original = write_finetuned_model(source)
    run_stage(planned)

    quantized = AutoModelForCausalLM.from_pretrained(output).eval()
    linear = {name: m.weight for name, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    # torchao's TorchAoConfig route leaves lm_head (like the embeddings and norms) in fp32.
    assert linear.pop("lm_head").dtype == torch.float32 and len(linear) == 7 * SHAPE["num_hidden_layers"]
    for name, weight in linear.items():
        assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8, name
        assert weight.scale.shape == (weight.shape[0], 1), name  # one scale per output channel

    # A no-op copy keeps 4 bytes per linear weight and a bf16 cast 2; int8 keeps 1, plus per-row scales
    # (3% at 128 inputs) and the file's headers. Everything else (embeddings, lm_head, norms) stays fp32.
    metrics = stage.metrics(planned.dir)
    assert metrics["bytes_before"] == quantize.weights_bytes(source)
    assert metrics["bytes_after"] == quantize.weights_bytes(output)
    linear_fp32 = 4 * sum(weight.numel() for weight in linear.values())
    unquantized = metrics["bytes_before"] - linear_fp32
    assert (metrics["bytes_after"] - unquantized) / linear_fp32 < 0.3, metrics

    # Rounding to 1/127 of each row's largest weight: about 1% relative error in the logits here; 3% allowed.
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = original(ids).logits, quantized(ids).logits
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 0.03
    assert AutoTokenizer.from_pretrained(output)("w3 w5")["input_ids"] == [3, 5]
