"""Fine-tuning on your own data: each format read by the real tasks stage, splits, broken rows, the mixture,
assistant-only labels, packing, and settings refused at planning."""

import json
import sysconfig
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from lmforge import chat, config, finetune, plan, tasks, tokenizer
from lmforge.schema import FinetuneTaskConfig
from tests.stages import TINY, curated, job_counts, run_stage, small_corpus_data
from tests.stages import plan as plan_stages

SUMS = [(a, b) for a in range(6) for b in range(5)]
QUESTIONS = [f"What is {a} plus {b}?" for a, b in SUMS]  # 30 distinct prompts


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat_rows() -> list:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a, b in SUMS
    ]
    broken = [
        "{not json",  # line 31
        {"messages": [{"role": "user", "content": "unanswered"}]},  # 32: no assistant answer
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 33: a bad role
        {"text": "no messages"},  # 34: prompt/response by auto, with no prompt field
    ]
    return [*rows, *broken, rows[0]]  # the last, line 35: a duplicate of line 1


def task(name: str, source: Path, **settings) -> str:
    fields = ",".join(f"{k}:{json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items())
    return "{" + f"name:{name},source:'{source}',license:cc-by-4.0" + (f",{fields}" if fields else "") + "}"


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_data")
    write_jsonl(root / "chat.jsonl", chat_rows())
    pairs = [{"question": q, "answer": q.split()[2]} for q in QUESTIONS]
    write_jsonl(root / "pairs.jsonl", [*pairs, {"question": "no answer"}, {"question": "q", "answer": 7}])
    # A directory of splits, in Parquet: the dataset's own train and test splits, no validation split.
    (root / "splits").mkdir()
    table = [{"prompt": q, "response": q.split()[4].rstrip("?")} for q in QUESTIONS]
    pq.write_table(pa.Table.from_pylist(table[:24]), root / "splits" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(table[24:]), root / "splits" / "test.parquet")
    return root


def user_tasks(root: Path) -> str:
    return (
        "finetune.data=["
        + ",".join(
            [
                task("chat", root / "chat.jsonl"),
                task(
                    "pairs",
                    root / "pairs.jsonl",
                    prompt_field="question",
                    response_field="answer",
                    system_prompt="Answer with one word.",
                    validation_fraction=0.2,
                    test_fraction=0.0,
                ),  # fmt: skip
                task("splits", root / "splits", test_split="test", validation_fraction=0.25, weight=3),
            ]
        )
        + "]"
    )


@pytest.fixture(scope="module")
def tasks_stage(datasets_dir, tmp_path_factory):
    """The real tasks stage (`python -m lmforge.tasks`) on the three datasets."""
    root = tmp_path_factory.mktemp("results")
    stages = plan_stages(root, [*small_corpus_data(root / "corpus"), *TINY, user_tasks(datasets_dir)])
    curated(stages)  # held-out examples are checked against its training documents
    run = run_stage(stages["tasks"])
    return stages["tasks"].dir, run.stderr


def by_name(stage_dir: str) -> dict[str, dict]:
    return {t["name"]: t for t in tasks.describe(stage_dir)}


def test_each_format_becomes_conversations_ending_with_the_answer(tasks_stage):
    stage_dir, _ = tasks_stage
    train = tasks.examples(stage_dir, "train")
    assert list(train) == ["chat", "pairs", "splits"]  # finetune.data's order
    for conversation in train["chat"]:
        [system, user, assistant] = conversation
        a, b = (int(word.rstrip("?")) for word in user["content"].split()[2::2])
        assert system == {"role": "system", "content": "You add numbers."} and user["role"] == "user"
        assert assistant == {"role": "assistant", "content": str(a + b)}
    assert {"role": "system", "content": "Answer with one word."} == train["pairs"][0][0]
    assert train["pairs"][0][1]["content"].startswith("What is") and train["pairs"][0][2]["role"] == "assistant"
    assert all(c[-1] == {"role": "assistant", "content": c[-2]["content"].split()[4][:-1]} for c in train["splits"])
    formats = {name: t["format"] for name, t in by_name(stage_dir).items()}
    assert formats == {"chat": "chat", "pairs": "prompt_response", "splits": "prompt_response"}
    parquet = pq.read_table(Path(stage_dir, "chat", "train.parquet"))  # for any reader: id and messages
    assert parquet.column_names == ["id", "messages"]


def test_broken_rows_are_skipped_counted_and_named_by_line(tasks_stage, datasets_dir):
    stage_dir, log = tasks_stage
    chat_task, pairs_task = by_name(stage_dir)["chat"], by_name(stage_dir)["pairs"]
    assert chat_task["rows_read"] == 35 and chat_task["broken_rows"] == 4 and chat_task["duplicates"] == 1
    named = chat_task["broken_examples"]
    assert [line.split(": ")[0] for line in named] == [f"{datasets_dir / 'chat.jsonl'}:{n}" for n in (31, 32, 33, 34)]
    assert "not UTF-8 JSON" in named[0] and "assistant" in named[1] and "'robot'" in named[2] and "'prompt'" in named[3]
    assert pairs_task["broken_rows"] == 2 and "'answer' is int" in pairs_task["broken_examples"][1]
    assert f"skipping broken row {datasets_dir / 'chat.jsonl'}:31" in log
    kept = sum(t["splits"][s]["examples"] for s in tasks.SPLITS for t in (chat_task,))
    assert kept == 30


def test_own_splits_are_kept_and_missing_ones_drawn_from_train(tasks_stage):
    stage_dir, _ = tasks_stage
    splits = by_name(stage_dir)["splits"]["splits"]
    assert {s: splits[s]["examples"] for s in tasks.SPLITS} == {"train": 18, "validation": 6, "test": 6}
    assert splits["test"]["origin"] == "the dataset's 'test' split"
    assert "25% of the train split, drawn with seed 1234" == splits["validation"]["origin"]
    prompts = {s: {c[-2]["content"] for c in tasks.examples(stage_dir, s)["splits"]} for s in tasks.SPLITS}
    assert prompts["test"] == set(QUESTIONS[24:])  # the dataset's own test split, whole
    assert (
        prompts["train"] | prompts["validation"] == set(QUESTIONS[:24]) and not prompts["train"] & prompts["validation"]
    )
    pairs = by_name(stage_dir)["pairs"]["splits"]
    assert (pairs["train"]["examples"], pairs["validation"]["examples"], pairs["test"]["examples"]) == (24, 6, 0)


def test_held_out_examples_seen_in_pretraining_are_dropped_and_counted(tmp_path):
    """A test answer that quotes a pretraining document was seen in training: it is dropped, not scored."""
    stages = plan_stages(tmp_path / "results", [*small_corpus_data(tmp_path / "corpus"), *TINY])
    train_text = pq.read_table(curated(stages) / "data" / "train.parquet").column("text")[0].as_py()
    quoted = " ".join(train_text.split()[100:160])  # 60 words: longer than the stdlib settings' 30-word n-grams
    rows = chat_rows()[:30]
    rows[25]["messages"][-1]["content"] = quoted
    write_jsonl(tmp_path / "qa" / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "qa" / "test.jsonl", rows[20:])
    qa = task("qa", tmp_path / "qa", test_split="test", validation_fraction=0.0)
    stages = plan_stages(
        tmp_path / "results", [*small_corpus_data(tmp_path / "corpus"), *TINY, f"finetune.data=[{qa}]"]
    )
    run = run_stage(stages["tasks"])
    [described] = tasks.describe(stages["tasks"].dir)
    assert described["leaked"] == {"validation": 0, "test": 1} and described["splits"]["test"]["examples"] == 9
    assert quoted not in json.dumps(tasks.examples(stages["tasks"].dir, "test")["qa"])
    assert "task qa: 1 test examples share a 30-word n-gram with a pretraining document: dropped" in run.stderr


def test_drawn_splits_are_a_function_of_the_seed():
    spec = FinetuneTaskConfig(name="t", source="/x.jsonl", validation_fraction=0.2, test_fraction=0.2)

    def drawn(seed: int) -> dict:
        splits = {"train": [(str(i), []) for i in range(50)], "validation": [], "test": []}
        tasks.draw_missing_splits(spec, splits, seed)
        return {split: [where for where, _ in rows] for split, rows in splits.items()}

    assert drawn(1) == drawn(1) and drawn(1) != drawn(2)
    assert [len(drawn(1)[s]) for s in tasks.SPLITS] == [30, 10, 10]


def test_a_hub_dataset_is_read_from_the_hf_cache_offline(tmp_path, monkeypatch):
    """As `hf download --repo-type dataset someone/sums` leaves it: a snapshot whose file names are its splits."""
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "datasets--someone--sums"
    write_jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", chat_rows()[:20])
    write_jsonl(repo / "snapshots" / commit / "data" / "test.jsonl", chat_rows()[20:30])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # planning, in this process
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the stage's job
    stages = plan_stages(
        tmp_path / "results",
        [
            *small_corpus_data(tmp_path / "corpus"),
            *TINY,
            "finetune.data=[{name:sums,source:someone/sums,license:mit,test_split:test}]",
        ],
    )
    curated(stages)
    run_stage(stages["tasks"])
    [sums] = tasks.describe(stages["tasks"].dir)
    assert {s: sums["splits"][s]["examples"] for s in tasks.SPLITS} == {"train": 18, "validation": 2, "test": 10}
    assert tasks.examples(stages["tasks"].dir, "test")["sums"][0][1]["content"] == QUESTIONS[20]
    with pytest.raises(config.ConfigError, match=r"'finetune.data.0.source=someone/absent'.*HF cache"):
        config.load(["finetune.data=[{name:a,source:someone/absent,license:mit}]"])


def test_bad_task_settings_fail_at_planning_naming_their_keys(datasets_dir):
    (datasets_dir / "empty.jsonl").write_text("\n")
    cases = {
        task("a", datasets_dir / "empty.jsonl"): "has no rows",
        task("a", datasets_dir / "pairs.jsonl", format="prompt_response", prompt_field="question"): (
            "'finetune.data.0.prompt_field=question': none of the first"
        ),
        task("a", datasets_dir / "missing.jsonl"): "'finetune.data.0.source=",
        "{name:a,source:" + str(datasets_dir / "chat.jsonl") + "}": "'finetune.data.0.license' is not set",
        task("a", datasets_dir / "chat.jsonl", test_split="test"): "'finetune.data.0.test_split=test'",
        task("a", datasets_dir / "splits", validation_split="dev"): "'finetune.data.0.validation_split=dev'",
        task("a", datasets_dir / "chat.jsonl", weight=0): "'finetune.data.0.weight'",
        task("a", datasets_dir / "chat.jsonl", format="sharegpt"): "'finetune.data.0.format'",
        task("a", datasets_dir / "chat.jsonl", max_tokens=100000): "'finetune.data.0.max_tokens=100000'",
        task("a b", datasets_dir / "chat.jsonl"): "'finetune.data.0.name'",
        task("a", "someone/not-downloaded"): "not in the HF cache"
        and "'finetune.data.0.source=someone/not-downloaded'",
        task("a", datasets_dir / "chat.jsonl", validation_fraction=0.5, test_fraction=0.5): "leave no training",
    }
    for tasks_setting, message in cases.items():
        with pytest.raises(config.ConfigError) as err:
            config.load([f"finetune.data=[{tasks_setting}]"])
        assert message in str(err.value), (tasks_setting, str(err.value))
    twice = f"finetune.data=[{task('a', datasets_dir / 'chat.jsonl')},{task('a', datasets_dir / 'pairs.jsonl')}]"
    with pytest.raises(config.ConfigError, match=r"'finetune.data.1.name=a'"):
        config.load([twice])


def test_no_task_plans_no_fine_tuning_and_a_fine_tuning_sweep_shares_the_tasks():
    for overrides in (["finetune=none"], ["finetune.data=[]"], ["finetune=lora", "finetune.data=[]"]):
        planned = plan.stages(config.load(overrides))
        assert "finetune" not in planned and "tasks" not in planned
        assert "finetune" not in planned["quantize"].config["inputs"]
    default, other_lr = (plan.stages(config.load(o)) for o in ([], ["finetune.train.lr=1e-5"]))
    assert default["tasks"].key == other_lr["tasks"].key and default["finetune"].key != other_lr["finetune"].key
    assert default["tasks"].config["finetune"] == {"data": [dict(config.load().finetune.data[0])]}
    assert plan.stages(config.load(["finetune.data.0.weight=2"]))["tasks"].key != default["tasks"].key


# -- what fine-tuning makes of the conversations ------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """The pipeline's own tokenizer (byte-level BPE, its chat template), trained on a few stdlib files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "shlex.py")]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.train_bpe([texts], 400, 2),
        bos_token=tokenizer.EOS,
        eos_token=tokenizer.EOS,
        pad_token=tokenizer.PAD,
        additional_special_tokens=tokenizer.CHAT_TOKENS,
        chat_template=config.load().tokenizer.chat_template,
    )


def test_labels_are_the_assistant_tokens_only(bpe_tokenizer):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "blue"},
    ]
    ids, labels = chat.render(bpe_tokenizer, conversation)
    assert bpe_tokenizer.decode(ids) == bpe_tokenizer.apply_chat_template(conversation, tokenize=False)
    trained = [i for i, label in zip(ids, labels) if label != chat.IGNORE]
    assert bpe_tokenizer.decode(trained) == "red<|im_end|>\nblue<|im_end|>\n"
    assert all(label in (chat.IGNORE, i) for i, label in zip(ids, labels))
    prompt, answer = chat.prompt_and_answer(bpe_tokenizer, conversation)
    assert prompt + answer == ids and bpe_tokenizer.decode(answer) == "blue<|im_end|>\n"
    assert bpe_tokenizer.decode(prompt).endswith("Another?<|im_end|>\n<|im_start|>assistant\n")


def test_overlong_examples_are_truncated_keeping_the_answer_or_dropped(bpe_tokenizer):
    long = chat.conversation("word " * 200, "short")
    short = chat.conversation("Hi.", "hello")
    counts = Counter()
    [cut, kept] = finetune.sft_examples(bpe_tokenizer, [long, short], 32, "truncate", counts)
    assert len(cut["input_ids"]) == 32 and counts == {"truncated": 1}
    assert bpe_tokenizer.decode([t for t in cut["labels"] if t != chat.IGNORE]) == "short<|im_end|>\n"
    assert kept == dict(zip(("input_ids", "labels"), chat.render(bpe_tokenizer, short), strict=True))
    counts = Counter()
    assert len(finetune.sft_examples(bpe_tokenizer, [long, short], 32, "drop", counts)) == 1
    assert counts == {"dropped_overlong": 1}


def test_a_mixture_follows_the_weights_and_the_seed():
    def draws(seed: int, n: int = 8000) -> list[tuple[int, int]]:
        stream = finetune.mixture([500, 7], [3.0, 1.0], seed)
        return [next(stream) for _ in range(n)]

    drawn = draws(0)
    shares = Counter(t for t, _ in drawn)
    assert abs(shares[0] / len(drawn) - 0.75) < 0.02 and abs(shares[1] / len(drawn) - 0.25) < 0.02
    small = Counter(i for t, i in drawn if t == 1)  # the small task cycles through all its examples evenly
    assert set(small) == set(range(7)) and max(small.values()) - min(small.values()) <= 1
    assert draws(0) == drawn and draws(1) != drawn


def tiny_model(architecture: str):
    torch.manual_seed(0)
    if architecture == "llama":
        model_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    else:
        model_config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as fine-tuning trains it
    return model


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_packed_examples_attend_only_to_themselves(architecture):
    model = tiny_model(architecture)
    first = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}
    second = {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}
    packed = finetune.collate([[first, second], [second]], pad_id=0)  # a packed row and a padded one
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed["labels"].tolist()[1] == [-100, 11, 12, -100, -100, -100, -100, -100]
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in (first, second)]
    torch.testing.assert_close(logits[0, :5], alone[0])
    torch.testing.assert_close(logits[0, 5:], alone[1])
    torch.testing.assert_close(logits[1, :3], alone[1])


def test_rows_pack_consecutive_examples_up_to_the_row_length():
    lengths = [3, 4, 2, 5, 1]
    stream = iter(range(5))
    rows = finetune.pack_rows(stream, lambda i: lengths[i], 7, 10, packing=True)
    assert rows == [[0, 1], [2, 3], [4]]
    assert finetune.pack_rows(iter(range(5)), lambda i: lengths[i], 7, 3, packing=False) == [[0], [1], [2]]


@pytest.mark.e2e
def test_a_run_on_a_user_dataset_ships_a_card_that_names_it(tmp_path, datasets_dir):
    """A prose corpus (no Python: the built-in task would find nothing) fine-tuned on a mixture of two of a
    user's datasets, chat and prompt/response, one three times as often as the other."""
    from tests.test_any_corpus import only_dir, snakemake

    source = datasets_dir / "chat.jsonl"
    user_task = task("arithmetic", source, description="Sums of small numbers, written for this test.")
    second = task("operands", datasets_dir / "splits", test_split="test", validation_fraction=0.25, weight=3)
    run = snakemake(tmp_path, f"finetune.data=[{user_task},{second}]")
    assert run.returncode == 0, run.stderr[-5000:]
    assert {"tasks", "finetune"} <= set(job_counts(run.stdout + run.stderr))
    results = tmp_path / "results"
    card = only_dir(results / "card")
    readme, sheet = (card / "model" / "README.md").read_text(), (card / "datasheet.md").read_text()
    for text in (readme, sheet):
        assert "arithmetic" in text and str(source) in text and "cc-by-4.0" in text
        assert "Sums of small numbers, written for this test." in text
    # No built-in wording where the card and datasheet say what the model is and was trained on: it did not run.
    card_sections, sheet_sections = (
        dict(part.split("\n", 1) for part in text.split("\n## ")[1:]) for text in (readme, sheet)
    )
    described = [readme.split("\n## ")[0], *(card_sections[s] for s in ("Training data", "Licences", "Limitations"))]
    described += [sheet_sections[s] for s in ("Source and licence", "Fine-tuning tasks", "Limitations")]
    assert "docstring" not in "".join(described).lower()
    assert "fine-tuned (full) by lmforge on a mixture of 2 tasks by weight: arithmetic" in readme
    assert "What is" in readme  # the usage prompt
    assert "a mixture of 2 tasks by weight" in readme and "operands" in readme and "operands" in sheet
    tuned = json.loads((only_dir(results / "finetune") / "manifest.json").read_text())["metrics"]
    assert tuned["arithmetic.train_examples"] == 24 and tuned["operands.train_examples"] == 18
    assert abs(tuned["operands.drawn_share"] - 0.75) < 0.1 and abs(tuned["arithmetic.drawn_share"] - 0.25) < 0.1
    scored = json.loads((only_dir(results / "evaluate") / "results.json").read_text())["models"]
    for model in ("pretrain", "finetune", "quantize"):  # each task on its own test split, before and after
        assert set(scored[model]["tasks"]) == {"arithmetic", "operands"}, model
