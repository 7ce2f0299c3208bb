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

from lmforge import evaluate, finetune, plan, pretrain, quantize, stage, tasks
from lmforge.schema import DataConfig, FinetuneConfig, StageConfig, stage_config

LABELS = {"baseline": "n-gram baseline", "base": "base model", "pretrain": "pretrained", "finetune": "fine-tuned"}
PROMPTINGS = {"first_word": "first-word heuristic", "zero_shot": "zero-shot", "chat": "chat template"}


def label(name: str, fine_tuned: bool) -> str:
    return ("fine-tuned, int8" if fine_tuned else "pretrained, int8") if name == "quantize" else LABELS[name]


def prompting_label(prompting: str, num_shots: int) -> str:
    return f"{num_shots}-shot" if prompting == "few_shot" else PROMPTINGS[prompting]


def with_error(metrics: dict | None, key: str) -> str:
    """A value with its standard error where it has one; n/a for a metric over no examples (None)."""
    value = (metrics or {}).get(key)
    if value is None:
        return "n/a"
    error = metrics.get(f"{key}_stderr")
    return f"{value:.3f}" if error is None else f"{value:.3f} ± {error:.3f}"


def harness_metrics(results: dict) -> list[tuple[str, str]]:
    """(task, metric) of every harness score, standard errors aside (they go beside their metric)."""
    found = {}
    for model in results["models"].values():
        for task, scores in model.get("harness", {}).items():
            for metric in scores or {}:
                if metric != "examples" and not metric.endswith("_stderr"):
                    found[(task, metric)] = None
    return list(found)


def evaluation_table(results: dict) -> str:
    """The forgetting table: every model, before (the base) and after fine-tuning, on the pretraining corpus's
    test split and on each task (fine-tuned models in their chat template, the others few-shot)."""
    tasks = list(results["task_examples"])
    harness = harness_metrics(results)
    header = ["model", "test bits/byte", "test perplexity"]
    header += [f"{task}: {what}" for task in tasks for what in ("prompting", "answer bits/byte", "exact match")]
    header += [f"{task}: {metric}" for task, metric in harness]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["forgetting"]["rows"]:
        m = results["models"][row["model"]]
        cells = [label(row["model"], row["fine_tuned"]), f"{m['test_bits_per_byte']:.3f}"]
        cells.append(f"{m['test_perplexity']:.2f}")
        for task in tasks:
            prompting = row[f"{task}.prompting"]
            if prompting is None:  # a model with no score on the task: the n-gram baseline on a user's dataset
                cells += ["n/a"] * 3
                continue
            scores = m["tasks"][task][prompting]
            cells += [prompting_label(prompting, results["num_shots"]), with_error(scores, "answer_bits_per_byte")]
            cells.append(with_error(scores, "exact_match_greedy"))
        cells += [with_error(m.get("harness", {}).get(task), metric) for task, metric in harness]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prompting_table(results: dict) -> str:
    """Each task's metrics for every model and prompting: in-context learning (zero-shot against few-shot)
    beside what fine-tuning taught, greedy decoding beside sampling."""
    lines = [
        "| model | task | prompting | answer bits/byte | exact match, greedy | exact match, sampled |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["forgetting"]["rows"]:
        if row["model"] == "baseline":
            continue
        for task, promptings in results["models"][row["model"]]["tasks"].items():
            for prompting in (p for p in ("zero_shot", "few_shot", "chat") if p in promptings):
                scores = promptings[prompting]
                cells = [label(row["model"], row["fine_tuned"]), task, prompting_label(prompting, results["num_shots"])]
                cells += [with_error(scores, key) for key in ("answer_bits_per_byte", "exact_match_greedy")]
                cells.append(with_error(scores, "exact_match_sampled"))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_model_license(base: str) -> str | None:
    """The licence in a base model's own card: a local directory's README.md, or the Hub cache's copy (no
    download: compute nodes are offline). None when there is no card or it names no licence."""
    local = Path(base, "README.md")
    cached = try_to_load_from_cache(base, "README.md") if not Path(base).exists() else None
    path = local if local.exists() else Path(cached) if isinstance(cached, str) else None
    return ModelCard.load(path, ignore_metadata_errors=True).data.license if path else None


def fine_tuning_data(described: list[dict]) -> str:
    """What the model was fine-tuned on, for the card's first sentence: each task's name, source and licence."""
    parts = [
        "docstring_to_name (predict a Python function's name from its docstring)"
        if task["builtin"]
        else f"{task['name']} ({task['source']}, {task['license']})"
        for task in described
    ]
    mixture = f"a mixture of {len(parts)} tasks by weight: " if len(parts) > 1 else ""
    return mixture + ", ".join(parts)


def tasks_section(described: list[dict], finetune_metrics: dict) -> str:
    """The fine-tuning tasks as they ran: source, licence, format, weight, examples per split and what was
    dropped; each one's description and where its splits came from."""
    if not described:
        return "None: the model is not fine-tuned (`finetune=none` or an empty `finetune.data`)."
    lines = [
        "| task | source | licence | format | weight | train | validation | test | broken rows | duplicates "
        "| held out, seen in pretraining | too long: truncated, dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for task in described:
        splits = task["splits"]
        too_long = ", ".join(
            str(sum(finetune_metrics.get(f"{task['name']}.{split}_{kind}", 0) for split in ("train", "validation")))
            for kind in ("truncated", "dropped_overlong")
        )
        lines.append(
            f"| {task['name']} | {task['source']} | {task['license']} | {task['format']} | {task['weight']:g} "
            f"| {splits['train']['examples']} | {splits['validation']['examples']} | {splits['test']['examples']} "
            f"| {task['broken_rows']} | {task['duplicates']} | {sum(task.get('leaked', {}).values())} | {too_long} |"
        )
        origins = "; ".join(f"{split}: {splits[split]['origin']}" for split in ("train", "validation", "test"))
        limit = f"at most {task['max_tokens']} tokens" if task["max_tokens"] else "at most the model's context"
        described_as = f"{task['description']} " if task["description"] else ""
        notes.append(f"- {task['name']}: {described_as}Splits: {origins}. Examples: {limit} ({task['overlong']}).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def licences(data_cfg: DataConfig, finetune_cfg: FinetuneConfig, model_license: str, described: list = ()) -> str:
    lines = [f"- Training data: {data_cfg.name}, {data_cfg.license}."]
    lines += [f"- Fine-tuning task {task['name']} ({task['source']}): {task['license']}." for task in described]
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


def model_index(data_cfg: DataConfig, results: dict, shipped_stage: str) -> list[EvalResult]:
    """The Hub's evaluation results of the shipped model: bits per byte on the corpus's test split, each task's
    answer bits/byte and exact match (where it has test examples), each harness score; a standard error is
    an entry of its own (metric type `<metric>_stderr`), as lm-evaluation-harness reports it."""
    shipped = results["models"][shipped_stage]
    row = next(r for r in results["forgetting"]["rows"] if r["model"] == shipped_stage)

    def entries(dataset: str, metric_type: str, metric_name: str, scores: dict) -> list[EvalResult]:
        found = []
        for suffix in ("", "_stderr"):
            value = scores.get(metric_type + suffix)
            if value is not None:
                found.append(
                    EvalResult(
                        task_type="text-generation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split="test",
                        metric_type=metric_type + suffix,
                        metric_name=metric_name + (" (standard error)" if suffix else ""),
                        metric_value=value,
                    )
                )
        return found

    found = entries(data_cfg.name, "test_bits_per_byte", "test bits per byte", shipped)
    for task, promptings in shipped["tasks"].items():
        prompting = row[f"{task}.prompting"]
        scores = promptings[prompting]
        found += entries(task, "answer_bits_per_byte", f"answer bits per byte ({prompting})", scores)
        for decoding in ("greedy", "sampled"):
            found += entries(task, f"exact_match_{decoding}", f"exact match, {decoding} ({prompting})", scores)
    for task, metric in harness_metrics(results):
        found += entries(task, metric, f"{metric} (lm-evaluation-harness)", shipped.get("harness", {}).get(task) or {})
    return found


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    inputs, card_cfg = cfg.inputs, cfg.card
    manifests = {name: stage.manifest(path) for name, path in inputs.items()}
    results = evaluate.results(inputs["evaluate"])
    data_cfg = stage_config(manifests["curate"]["config"]).data
    sampling = results["sampling"]
    finetuned = "finetune" in inputs  # not with finetune=none: the pretrained model is shipped
    described = tasks.describe(inputs["tasks"]) if finetuned else []
    shipped_stage = "finetune" if finetuned else "pretrain"
    shipped_dir = finetune.model_dir(inputs["finetune"]) if finetuned else pretrain.model_dir(inputs["pretrain"])

    card_data = ModelCardData(
        model_name=card_cfg.model_name,
        license=card_cfg.license,
        language=card_cfg.language,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["lmforge", "deepspeed"],
        eval_results=model_index(data_cfg, results, shipped_stage),
        datasets=[task["source"] for task in described if not task["builtin"] and not tasks.is_local(task["source"])]
        or None,  # the Hub datasets it was fine-tuned on
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
        origin += f" on {fine_tuning_data(described)}."
        first = next(c for split in ("test", "train") for c in tasks.examples(inputs["tasks"], split, 1).values() if c)
        usage = (
            f"prompt = tokenizer.apply_chat_template({first[0][:-1]!r}, add_generation_prompt=True, "
            'return_tensors="pt")'
        )
    else:
        usage = 'prompt = tokenizer("The", return_tensors="pt").input_ids'
    training = yaml.safe_dump(training_configs, sort_keys=False)
    evaluation = evaluation_table(results)
    if results["task_examples"]:
        evaluation += f"\n\n{prompting_table(results)}"
    examples = "".join(f"{task}: {n} test examples, " for task, n in results["task_examples"].items())
    shots = f" and with {results['num_shots']} examples of each task's train split" if results["num_shots"] else ""
    prompting = (
        f" Models before fine-tuning are prompted zero-shot{shots}; fine-tuned models in their chat template. "
        "Answer bits/byte: the answer's negative log-likelihood after its prompt, in bits per UTF-8 byte of the answer."
        if results["task_examples"]
        else ""
    )
    harness_run = results["harness"]
    harness_shots = "each task's own number of" if harness_run["num_fewshot"] is None else harness_run["num_fewshot"]
    harness_limit = "all examples" if harness_run["limit"] is None else f"{harness_run['limit']} examples a task"
    harness_note = (
        f" lm-evaluation-harness: {', '.join(harness_run['tasks'])}, {harness_shots} shots, {harness_limit}."
        if harness_run["tasks"]
        else ""
    )
    settings = (
        f"Seed {results['seed']}. Greedy decoding and sampling with temperature {sampling['temperature']}, top-k "
        f"{sampling['top_k']}, top-p {sampling['top_p']}, at most {results['greedy']['max_new_tokens']} new tokens; "
        f"{examples}{results['test_documents']} test documents ({results['test_bytes']} bytes).{prompting}{harness_note}"
    )
    if data_cfg.source == "stdlib" and [task["builtin"] for task in described] == [True]:
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
Pretraining: {data_cfg.name} ({data_cfg.license}); see `datasheet.md` beside this card.

Fine-tuning:

{tasks_section(described, manifests["finetune"]["metrics"] if finetuned else {})}

## Training
```yaml
{training}```

## Evaluation
{evaluation}

{settings}

## Licences
{licences(data_cfg, finetune_cfg, card_cfg.license, described)}

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

    # Curation's draft describes the built-in task it built; the tasks that ran take its place.
    curate_sheet = Path(inputs["curate"], "datasheet.md").read_text().split("\n## Fine-tuning task\n")[0]
    tokenizer_metrics = manifests["tokenizer"]["metrics"]
    (out / "datasheet.md").write_text(
        f"""{curate_sheet}
## Fine-tuning tasks
{tasks_section(described, manifests["finetune"]["metrics"] if finetuned else {})}

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
    builtin = results["builtin_task"] if finetuned else None
    greedy = results["models"]["finetune"]["tasks"][builtin]["chat"]["exact_match_greedy"] if builtin else None
    return {"finetune_exact_match_greedy": greedy} if builtin else {}


if __name__ == "__main__":
    stage.run(main)
