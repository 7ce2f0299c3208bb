"""Stage 8, card: the exported model with a Hugging Face model card, and the datasheet.

Outputs:
  model/          the fine-tuned model (with `finetune=none`, the pretrained one) and tokenizer (hard links when
                  possible) with README.md, the model card: YAML metadata and a model-index of the evaluation results
  datasheet.md    data source and licence, curation counts, splits, tokenizer, training config,
                  evaluation table with sampling settings and seeds, limitations
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from lmforge import evaluate, finetune, plan, pretrain, quantize, stage
from lmforge.schema import DataConfig, FinetuneConfig, StageConfig, stage_config

ROWS = [  # (label, model key, prompting whose exact match the table shows)
    ("n-gram baseline", "baseline", None),
    ("pretrained", "pretrain", "few_shot"),
    ("fine-tuned", "finetune", "chat"),
    ("fine-tuned, int8", "quantize", "chat"),
]
NOT_FINETUNED_ROWS = [*ROWS[:2], ("pretrained, int8", "quantize", "few_shot")]


def with_error(metrics: dict, key: str) -> str:
    """A rate with its standard error; n/a for a rate over no examples (None)."""
    if metrics[key] is None:
        return "n/a"
    return f"{metrics[key]:.3f} ± {metrics[key + '_stderr']:.3f}"


def evaluation_table(results: dict) -> str:
    lines = [
        "| model | test bits/byte | test perplexity | exact match, greedy | exact match, sampled |",
        "|---|---|---|---|---|",
    ]
    for label, key, prompting in ROWS if "finetune" in results["models"] else NOT_FINETUNED_ROWS:
        m = results["models"][key]
        if prompting is None:
            heuristic = with_error(m, "task_exact_match")
            greedy, sampled = (heuristic if heuristic == "n/a" else f"{heuristic} (first-word heuristic)"), "n/a"
        else:
            greedy = with_error(m, f"task_exact_match_{prompting}_greedy")
            sampled = with_error(m, f"task_exact_match_{prompting}_sampled")
        lines.append(f"| {label} | {m['test_bits_per_byte']:.3f} | {m['test_perplexity']:.2f} | {greedy} | {sampled} |")
    return "\n".join(lines)


def base_model_license(base: str) -> str | None:
    """The licence in a base model's own card: a local directory's README.md, or the Hub cache's copy (no
    download: compute nodes are offline). None when there is no card or it names no licence."""
    local = Path(base, "README.md")
    cached = try_to_load_from_cache(base, "README.md") if not Path(base).exists() else None
    path = local if local.exists() else Path(cached) if isinstance(cached, str) else None
    return ModelCard.load(path, ignore_metadata_errors=True).data.license if path else None


def licences(data_cfg: DataConfig, finetune_cfg: FinetuneConfig, model_license: str) -> str:
    lines = [f"- Training data: {data_cfg.name}, {data_cfg.license}."]
    if finetune_cfg.base != "pretrain":
        base_license = base_model_license(finetune_cfg.base)
        lines.append(f"- Base model `{finetune_cfg.base}`: {base_license or 'no licence found in its card'}.")
        if base_license != model_license:
            lines.append(
                f"- This card says `{model_license}` (`card.license`), which is not the base model's licence: "
                "a fine-tuned model is a derivative of its base, so check that its terms allow this one."
            )
    lines.append(f"- This model: {model_license}.")
    return "\n".join(lines)


def compute_table(manifests: dict) -> str:
    """Hardware, wall time and device-hours of the training stages, and pretraining's compute as 6·N·D."""
    lines = [
        "| stage | hardware | processes | wall time | device-hours | training compute |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("pretrain", "finetune"):
        if name not in manifests:  # finetune=none
            continue
        manifest = manifests[name]
        processes = plan.Stage(name, manifest["key"], manifest["config"]).processes
        metrics, seconds = manifest["metrics"], manifest["duration_s"]  # every attempt's time (lmforge.stage)
        attempts = len(manifest.get("attempts", ()))  # manifests written before attempts were recorded have none
        wall_time = f"{seconds:.0f} s" + (f", {attempts} attempts" if attempts > 1 else "")
        flops = (
            f"{6 * metrics['non_embedding_parameters'] * metrics['train_tokens_seen']:.2e} FLOPs "
            f"(6 × {metrics['non_embedding_parameters']:,} parameters × {metrics['train_tokens_seen']:,} tokens)"
            if name == "pretrain"
            else "not estimated"
        )
        lines.append(
            f"| {name} | {manifest['environment'].get('device', 'not recorded')} | {processes} | {wall_time} "
            f"| {seconds * processes / 3600:.3f} | {flops} |"
        )
    return "\n".join(lines)


def link_tree(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (no extra quota), copies elsewhere."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def model_index(data_cfg: DataConfig, shipped: dict, prompting: str) -> list[EvalResult]:
    """The Hub's evaluation results of the shipped model: bits per byte, and the task's exact match where it has
    test pairs."""

    def result(metric_type: str, metric_name: str, value: float) -> EvalResult:
        return EvalResult(
            task_type="text-generation",
            dataset_type=data_cfg.name,
            dataset_name=f"{data_cfg.name} test split",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
        )

    exact_match = [
        result("exact_match", f"docstring->name exact match ({decoding})", value)
        for decoding in ("greedy", "sampled")
        if (value := shipped[f"task_exact_match_{prompting}_{decoding}"]) is not None
    ]
    return [*exact_match, result("bits_per_byte", "test bits per byte", shipped["test_bits_per_byte"])]


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    inputs, card_cfg = cfg.inputs, cfg.card
    manifests = {name: stage.manifest(path) for name, path in inputs.items()}
    results = evaluate.results(inputs["evaluate"])
    data_cfg = stage_config(manifests["curate"]["config"]).data
    sampling = results["sampling"]
    finetuned = "finetune" in inputs  # not with finetune=none: the pretrained model is shipped
    shipped_stage, prompting = ("finetune", "chat") if finetuned else ("pretrain", "few_shot")
    shipped = results["models"][shipped_stage]
    shipped_dir = finetune.model_dir(inputs["finetune"]) if finetuned else pretrain.model_dir(inputs["pretrain"])

    card_data = ModelCardData(
        model_name=card_cfg.model_name,
        license=card_cfg.license,
        language=card_cfg.language,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["lmforge", "deepspeed"],
        eval_results=model_index(data_cfg, shipped, prompting),
    )
    pretrain_raw = manifests["pretrain"]["config"]
    training_configs = {"model": pretrain_raw["model"], "pretrain": pretrain_raw["train"]}
    if finetuned:
        finetune_raw = manifests["finetune"]["config"]
        finetune_cfg = stage_config(finetune_raw).finetune
        training_configs["finetune"] = finetune_raw["finetune"]
    else:
        finetune_cfg = FinetuneConfig(method="none")
    external_base = finetune_cfg.base != "pretrain"
    if external_base:
        card_data.base_model = finetune_cfg.base  # the Hub links the card to the model it was tuned from
    if not finetuned:
        origin = (
            f"A Llama-style causal LM pretrained from scratch on {data_cfg.name} by lmforge; not fine-tuned "
            "(`finetune=none`)."
        )
    elif external_base:
        origin = f"Fine-tuned ({finetune_cfg.method}) from `{finetune_cfg.base}` by lmforge"
    else:
        origin = f"A Llama-style causal LM pretrained from scratch and fine-tuned ({finetune_cfg.method}) by lmforge"
    if finetuned:
        origin += " to predict a Python function's name from its docstring."
        usage = (
            'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Return the sum of two numbers."}], '
            'add_generation_prompt=True, return_tensors="pt")'
        )
    else:
        usage = 'prompt = tokenizer("The", return_tensors="pt").input_ids'
    training = yaml.safe_dump(training_configs, sort_keys=False)
    evaluation = evaluation_table(results)
    settings = (
        f"Seed {results['seed']}. Greedy decoding and sampling with temperature {sampling['temperature']}, top-k "
        f"{sampling['top_k']}, top-p {sampling['top_p']}, at most {results['greedy']['max_new_tokens']} new tokens; "
        f"{results['task_examples']} test pairs, {results['test_documents']} test documents ({results['test_bytes']} bytes). "
        f"The pretrained model is prompted with {results['few_shot']} examples."
    )
    if data_cfg.source == "stdlib" and finetuned:
        limitations = (
            "A tiny research model trained in minutes on CPU: it names functions from docstrings in the style of the "
            "Python standard library and does nothing else well. Do not use it for anything but testing the pipeline."
        )
    else:
        limitations = "Evaluated only on the held-out split of its own corpus."
    shipped_code = manifests[shipped_stage]["code"]
    card = ModelCard.from_template(
        card_data,
        template_str="---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\n{{ body }}\n",
        model_name=card_cfg.model_name,
        body=f"""{origin}

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
{usage}
print(tokenizer.decode(model.generate(prompt, max_new_tokens=8)[0]))
```

## Training data
{data_cfg.name} ({data_cfg.license}); see `datasheet.md` beside this card.

## Training
```yaml
{training}```

## Evaluation
{evaluation}

{settings}

## Licences
{licences(data_cfg, finetune_cfg, card_cfg.license)}

## Compute
{compute_table(manifests)}

Wall time is the whole stage's (loading, training, validation, checkpoints, export), summed over its jobs
when it was interrupted and resumed; device-hours are processes × wall time. Energy was not measured: the
device-hours times the devices' power draw give an estimate.

## Limitations
{limitations}

## Provenance
Configuration key `{cfg.run.run_key}`; lmforge {shipped_code["lmforge"]}, git commit
`{shipped_code["git_commit"]}`. An int8 weight-only variant is in `{quantize.model_dir(inputs["quantize"])}`.
""",
    )
    link_tree(Path(shipped_dir), out / "model")
    card.save(out / "model" / "README.md")

    curate_sheet = Path(inputs["curate"], "datasheet.md").read_text()
    tokenizer_metrics = manifests["tokenizer"]["metrics"]
    (out / "datasheet.md").write_text(
        f"""{curate_sheet}
## Tokenizer
Byte-level BPE, vocabulary {tokenizer_metrics["vocab_size"]}, trained on the train split only;
{tokenizer_metrics["validation_bytes_per_token"]:.3f} bytes per token on validation.

## Training configuration
```yaml
{training}```

## Evaluation
{evaluation}

{settings}

## Limitations
{limitations}
"""
    )
    tracker.log_artifacts([out / "model" / "README.md", out / "datasheet.md"])
    greedy = shipped[f"task_exact_match_{prompting}_greedy"]
    return {"finetune_exact_match_greedy": greedy} if finetuned else {}


if __name__ == "__main__":
    stage.run(main)
