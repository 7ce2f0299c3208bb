"""The config schema: every setting's type, default, and valid range or choices.

The YAML files under conf/ hold the values; the dataclasses here hold the types, and each setting with a
range or a set of choices declares it (`setting(default, check)`), so `lmforge.config` can check every
value when the DAG is planned and name the key of one that is out of range.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# -- valid values: each setting that has a range or a set of choices says so where it is declared ------------


@dataclass(frozen=True)
class Check:
    """What a valid value is, in words for the error message, and as a test."""

    says: str
    holds: Callable[[Any], bool]


def setting(default: Any, check: Check) -> Any:
    """A schema field whose value must pass `check` (None passes: it means "not set")."""
    return field(default=default, metadata={"check": check})


def at_least(low: float) -> Check:
    return Check(f">= {low}", lambda v: v >= low)


def above(low: float) -> Check:
    return Check(f"> {low}", lambda v: v > low)


def fraction(upper_open: bool = True) -> Check:
    return Check("in [0, 1)", lambda v: 0 <= v < 1) if upper_open else Check("in [0, 1]", lambda v: 0 <= v <= 1)


def one_of(*choices: Any) -> Check:
    return Check(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def matches(pattern: str, says: str) -> Check:
    compiled = re.compile(pattern)
    return Check(says, lambda v: compiled.fullmatch(v) is not None)


# Names that become directories, MLflow experiments and Slurm arguments: no shell or wildcard characters.
NAME = matches(r"(?!\.{1,2}$)[A-Za-z0-9._-]+", "letters, digits and . _ - only (a file name)")
PATH = matches(r"(?!-)[A-Za-z0-9._/+,@=:-]+", "a path of letters, digits and . _ / + , @ = : - only")
PARTITIONS = matches(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "Slurm partition names, comma-separated")
SLURM_NAME = matches(r"[A-Za-z0-9._-]+", "a Slurm account or QOS name: letters, digits and . _ - only")
# Node features joined by Slurm's operators (sbatch --constraint): a100&ib, [rack1|rack2], gpu*2.
CONSTRAINT = matches(r"[A-Za-z0-9._,&|\[\]*:()-]+", "Slurm node features and the operators & | , [ ] * : ( ) only")
GPU_MODEL = matches(r"[A-Za-z0-9_.]+", "a GPU type as the cluster's gres names it (a100, h100_80gb): letters, digits, _ .")


@dataclass
class TaskConfig:
    min_docstring_words: int = setting(5, at_least(1))
    max_docstring_chars: int = setting(400, at_least(1))


@dataclass
class GopherQualityConfig:
    """Gopher's document rules (Rae et al. 2021), datatrove's GopherQualityFilter; prose documents only."""

    enabled: bool = True
    min_doc_words: int = setting(50, at_least(0))
    max_doc_words: int = setting(100_000, at_least(1))
    min_avg_word_length: int = setting(3, at_least(0))
    max_avg_word_length: int = setting(10, at_least(1))
    max_symbol_word_ratio: float = setting(0.1, fraction(upper_open=False))
    max_bullet_lines_ratio: float = setting(0.9, fraction(upper_open=False))
    max_ellipsis_lines_ratio: float = setting(0.3, fraction(upper_open=False))
    min_alpha_words_ratio: float = setting(0.8, fraction(upper_open=False))
    min_stop_words: int = setting(2, at_least(0))


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition rules, datatrove's GopherRepetitionFilter; prose documents only."""

    enabled: bool = True
    dup_line_frac: float = setting(0.3, fraction(upper_open=False))
    dup_para_frac: float = setting(0.3, fraction(upper_open=False))
    dup_line_char_frac: float = setting(0.2, fraction(upper_open=False))
    dup_para_char_frac: float = setting(0.2, fraction(upper_open=False))


@dataclass
class C4LinesConfig:
    """C4's line rules (Raffel et al. 2020), datatrove's C4QualityFilter: drops lines, then short documents."""

    enabled: bool = True
    min_num_sentences: int = setting(5, at_least(0))
    min_words_per_line: int = setting(3, at_least(0))
    max_word_length: int = setting(1000, at_least(1))
    filter_curly_bracket: bool = True  # C4 drops a page with a '{' (code); off for prose that quotes code


@dataclass
class LanguageIdConfig:
    """fastText language identification; needs a model file (lid.176.bin), which lmforge does not download."""

    enabled: bool = False
    model_path: str | None = None
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = setting(0.65, fraction())


@dataclass
class PiiConfig:
    """Emails and public IP addresses replaced (datatrove's PIIFormatter), counted per kind."""

    enabled: bool = True
    emails: bool = True
    ips: bool = True


@dataclass
class LicenseFilterConfig:
    """Keep only documents whose licence (the row's data.license_field, else data.license) is allowed."""

    enabled: bool = False
    allow: list[str] = field(default_factory=list)


@dataclass
class FiltersConfig:
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4_lines: C4LinesConfig = field(default_factory=C4LinesConfig)
    language: LanguageIdConfig = field(default_factory=LanguageIdConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    license: LicenseFilterConfig = field(default_factory=LicenseFilterConfig)


@dataclass
class DedupConfig:
    """Exact (sha256) and MinHash LSH near-duplicate removal across all shards; the earliest document is kept."""

    exact: bool = True
    near: bool = True
    ngram: int = setting(5, at_least(1))  # words per shingle
    bands: int = setting(14, at_least(1))
    rows: int = setting(8, at_least(1))  # hashes per band: bands x rows hashes per document
    threshold: float = setting(0.7, fraction(upper_open=False))  # estimated Jaccard a candidate pair must reach
    seed: int = setting(1, at_least(0))


@dataclass
class DecontaminationConfig:
    """Training documents sharing a word n-gram with an evaluation text are dropped."""

    enabled: bool = True
    ngram: int = setting(13, at_least(1))
    # An n-gram more training documents hold than this is boilerplate (a licence header, an idiom of code), not a
    # leak, and does not count; None: every shared n-gram counts.
    max_documents: int | None = setting(10, at_least(1))


@dataclass
class DataConfig:
    name: str = MISSING
    # "stdlib", a local .jsonl/.parquet/.txt file or directory, or a Hub dataset name (read from the HF cache).
    source: str = MISSING
    subset: str | None = None  # a Hub dataset's configuration name
    split: str = "train"  # the Hub dataset's split that is read
    text_field: str = "text"
    license: str = MISSING
    license_field: str = "license"  # a row's own licence column, when the source has one; else data.license
    # Which rules apply: prose (Gopher, C4), code (none of them), auto (code for code files, by suffix).
    profile: str = setting("auto", one_of("auto", "prose", "code"))
    shards: int = setting(1, at_least(1))  # curation jobs reading a part of the input each, then one merge job
    batch_size: int = setting(1000, at_least(1))  # documents per Parquet batch read and written
    normalization: str = setting("NFC", one_of("NFC", "NFD", "NFKC", "NFKD"))
    min_chars: int = setting(64, at_least(0))
    max_chars: int = setting(200_000, at_least(1))
    max_documents: int | None = setting(None, at_least(1))
    validation_fraction: float = setting(0.05, fraction())
    test_fraction: float = setting(0.1, fraction())
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    # More evaluation texts to decontaminate against: .jsonl (a "text" field), .parquet (a "text" column), .txt.
    decontaminate_against: list[str] = field(default_factory=list)
    task: TaskConfig = field(default_factory=TaskConfig)


# Byte-level BPE starts from the 256 byte tokens and 4 special tokens: a smaller vocabulary cannot exist.
MIN_VOCAB_SIZE = 256 + 4 + 1


@dataclass
class TokenizerConfig:
    vocab_size: int = setting(4096, at_least(MIN_VOCAB_SIZE))
    min_frequency: int = setting(2, at_least(1))
    # The BPE trains on a seeded sample of the train split of at most this many bytes of text (all of it when
    # smaller). 1 GiB: a vocabulary of a few thousand to 50k merges has settled long before, the trainer's word
    # counts stay within the job's memory, and the 12 MB stdlib default is used whole.
    train_bytes: int = setting(2**30, at_least(2**16))
    chat_template: str = MISSING


@dataclass
class BaselineConfig:
    order: int = setting(2, at_least(1))
    discount: float = setting(0.75, Check("in (0, 1)", lambda v: 0 < v < 1))


@dataclass
class ModelConfig:
    name: str = MISSING
    architecture: str = setting("llama", one_of("llama", "gpt2"))
    hidden_size: int = setting(128, at_least(1))
    intermediate_size: int = setting(384, at_least(1))
    num_layers: int = setting(4, at_least(1))
    num_heads: int = setting(4, at_least(1))
    num_kv_heads: int = setting(4, at_least(1))
    max_seq_len: int = setting(256, at_least(2))


@dataclass
class TrainConfig:
    steps: int = setting(300, at_least(1))
    micro_batch_size: int = setting(16, at_least(1))
    grad_accum: int = setting(1, at_least(1))
    lr: float = setting(3e-3, above(0))
    min_lr_ratio: float = setting(0.1, fraction(upper_open=False))
    warmup_steps: int = setting(30, at_least(0))
    weight_decay: float = setting(0.1, at_least(0))
    grad_clip: float = setting(1.0, above(0))
    zero_stage: int = setting(0, one_of(0, 1, 2, 3))
    # fp32 | bf16 (DeepSpeed's: bf16 weights and gradients, fp32 master weights)
    precision: str = setting("fp32", one_of("fp32", "bf16"))
    eval_every: int = setting(100, at_least(1))
    eval_batches: int = setting(8, at_least(1))
    checkpoint_every: int = setting(100, at_least(1))
    processes: int = setting(1, at_least(1))
    # To CPU memory: the optimizer (ZeRO 1-3), or the optimizer and the parameters (ZeRO 3)
    offload: str = setting("none", one_of("none", "optimizer", "optimizer+parameters"))
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model; minutes of compilation at the start
    attention: str = setting("sdpa", one_of("sdpa", "eager", "flash_attention_2"))  # flash: the flash-attn package
    peak_tflops: float | None = setting(None, above(0))  # a device's bf16 peak, for MFU; None: from the GPU's name


@dataclass
class LoraConfig:
    r: int = setting(16, at_least(1))
    alpha: int = setting(32, at_least(1))
    dropout: float = setting(0.0, fraction())
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


BUILTIN_TASK = "docstring_to_name"  # the built-in task: docstring -> function name, from the corpus's Python


@dataclass
class FinetuneTaskConfig:
    """One fine-tuning task of `finetune.data`: the built-in, or a dataset."""

    name: str = setting(BUILTIN_TASK, NAME)  # names its directory in the tasks stage, its metrics, its card rows
    # `docstring_to_name` (the built-in, from the curated corpus), a local .jsonl/.parquet file or a directory
    # of <split>.jsonl/.parquet files, or a Hub dataset name (read from the HF cache: compute nodes are offline).
    source: str = BUILTIN_TASK
    # chat: a list of {role, content} messages per row; prompt_response: two text columns; auto: chat when the
    # row has `messages_field`.
    format: str = setting("auto", one_of("auto", "chat", "prompt_response"))
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_prompt: str | None = None  # a system message put before every prompt/response pair
    hub_config: str | None = None  # a Hub dataset's configuration (subset) name
    # The dataset's own splits (Hub split names; in a directory, file names without the suffix); a split that is
    # None is drawn from the train split, seeded by `seed`, by its fraction. The built-in task has curate's splits.
    train_split: str = "train"
    validation_split: str | None = None
    test_split: str | None = None
    validation_fraction: float = setting(0.1, fraction())
    test_fraction: float = setting(0.1, fraction())
    weight: float = setting(1.0, above(0))  # the task's share of the training examples: weight / sum of weights
    max_tokens: int | None = setting(None, at_least(2))  # an example's length limit; None: the model's context
    overlong: str = setting("truncate", one_of("truncate", "drop"))  # truncate: cut the oldest turns' tokens
    max_examples: int | None = setting(None, at_least(1))  # the first N rows of each split read; None: all
    license: str | None = None  # a dataset's licence (required); the built-in task's is the corpus's (data.license)
    description: str | None = None  # where the data comes from, for the card and datasheet; None: the source


@dataclass
class FinetuneConfig:
    method: str = setting("full", one_of("full", "lora", "qlora", "none"))  # none: no fine-tuning stage
    base: str = "pretrain"  # `pretrain` (this pipeline's model) or a Hugging Face model name or local path
    # The tasks; more than one is multi-task fine-tuning (a mixture by weight). None: no fine-tuning stage.
    data: list[FinetuneTaskConfig] = field(default_factory=list)
    # Short examples share a row of the model's context, each attending only to itself (position ids restart).
    packing: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class QuantizeConfig:
    method: str = setting("int8_weight_only", one_of("int8_weight_only", "none"))


@dataclass
class SamplingConfig:
    temperature: float = setting(0.8, above(0))
    top_k: int = setting(50, at_least(0))  # 0: no top-k cut
    top_p: float = setting(0.95, Check("in (0, 1]", lambda v: 0 < v <= 1))


def harness_task(task: str) -> bool:
    """A task name, or a task YAML file that exists (checked at planning, not when the job reaches it)."""
    return Path(task).is_file() if task.endswith((".yaml", ".yml")) else re.fullmatch(r"[\w.*-]+", task) is not None


HARNESS_TASKS = Check(
    "lm-evaluation-harness task names (letters, digits, _ . - *) or paths of existing task .yaml files",
    lambda tasks: all(harness_task(task) for task in tasks),
)


@dataclass
class HarnessConfig:
    # lm-evaluation-harness tasks: the shipped lmforge_* tasks (lmforge/harness_tasks, on the curated task split),
    # the harness's own task names (their data from the Hugging Face cache), or paths to task YAML files.
    tasks: list[str] = field(
        default_factory=lambda: ["lmforge_docstring_to_name_choice", "lmforge_docstring_to_name_generate"],
        metadata={"check": HARNESS_TASKS},
    )
    num_fewshot: int | None = setting(None, at_least(0))  # None: each task's own (the shipped ones: 0)
    limit: int | None = setting(None, at_least(1))  # examples per task; None: all
    batch_size: int = setting(16, at_least(1))


@dataclass
class EvalConfig:
    max_new_tokens: int = setting(16, at_least(1))
    # Models before fine-tuning are scored zero-shot and with this many examples from each task's train split.
    num_shots: int = setting(3, at_least(0))
    max_task_examples: int | None = setting(None, at_least(1))
    max_test_documents: int | None = setting(None, at_least(1))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    prompt_template: str = "# {docstring}\ndef "
    shot_template: str = "# {docstring}\ndef {name}(...):\n    ...\n\n"


@dataclass
class CardConfig:
    model_name: str = "lmforge-tiny-docstring2name"
    license: str = "apache-2.0"
    language: str = "code"


@dataclass
class StageResources:
    cpus: int = setting(1, at_least(1))
    mem_mb: int = setting(4000, at_least(1))
    runtime: int = setting(60, at_least(1))  # minutes, per attempt
    # Per node; training stages run one process per GPU (train.processes = gpus x nodes)
    gpus: int = setting(0, at_least(0))
    nodes: int = setting(1, at_least(1))
    partition: str | None = setting(None, PARTITIONS)
    account: str | None = setting(None, SLURM_NAME)  # sbatch -A, where the cluster charges an account
    qos: str | None = setting(None, SLURM_NAME)
    constraint: str | None = setting(None, CONSTRAINT)  # sbatch -C: node features
    gpu_model: str | None = setting(None, GPU_MODEL)  # with gpus: --gpus=<model>:<n>
    # Training stages: Slurm sends SIGURG this many seconds before the walltime; the loop checkpoints and
    # requeues its job. slurmctld looks at time limits every 30 s and sends no warning it finds late (seen
    # with Slurm 22.05: @5 was never sent), so less than 30 s may never come.
    signal_before_end_s: int | None = setting(None, at_least(30))


@dataclass
class RunConfig:
    """Where and under what name a run is recorded. Not part of any stage hash."""

    results_dir: str = setting("results", PATH)
    experiment: str = setting("lmforge", NAME)
    mlflow_uri: str | None = None  # default: sqlite in results_dir; MLFLOW_TRACKING_URI overrides
    wandb: bool = False
    sweep: str | None = setting(None, NAME)  # the id of this configuration's sweep; set by the sweep expansion
    # A name in the MLflow model registry: each configuration's shipped model becomes a version of it.
    register_model: str | None = setting(None, NAME)


@dataclass
class Config:
    seed: int = setting(1234, at_least(0))
    data: DataConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    baseline: BaselineConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    finetune: FinetuneConfig = MISSING
    quantize: QuantizeConfig = MISSING
    eval: EvalConfig = MISSING
    card: CardConfig = field(default_factory=CardConfig)
    resources: dict[str, StageResources] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)


ConfigStore.instance().store(name="schema", node=Config)


# -- what one stage job reads ------------------------------------------------------------------------------------


@dataclass
class StageRunConfig(RunConfig):
    run_key: str | None = None  # the configuration's key: its MLflow parent run
    checkpoint_dir: str | None = None  # training stages: outside the stage's output, so a rerun resumes


@dataclass
class StageConfig:
    """The config of one stage job (lmforge.plan writes it): the sections the stage reads, the others None."""

    stage: str = MISSING
    key: str = MISSING
    inputs: dict[str, str] = field(default_factory=dict)  # upstream job (stage, or stage_<shard>) -> its directory
    shard: int | None = None  # a sharded stage's job: which shard of its input it reads (of data.shards)
    run: StageRunConfig = field(default_factory=StageRunConfig)
    seed: int | None = None
    data: DataConfig | None = None
    tokenizer: TokenizerConfig | None = None
    baseline: BaselineConfig | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    finetune: FinetuneConfig | None = None
    quantize: QuantizeConfig | None = None
    eval: EvalConfig | None = None
    card: CardConfig | None = None


def stage_config(raw: dict) -> StageConfig:
    """A stage's resolved config as the schema's dataclasses, with attribute access and the schema's types."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StageConfig), raw))
