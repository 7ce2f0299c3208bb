"""Curation's filters on a generated corpus whose defects are known (lmforge.corpus_gen's manifest).

The shard and merge stages run as jobs do (`python -m lmforge.curate_shard ...`, then `lmforge.curate`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmforge import corpus_gen, dedup, filters, schema, sources
from tests.stages import curated, plan

ALLOWED = ",".join(corpus_gen.LICENSES)


def curate(results: Path, corpus: Path, *overrides: str) -> tuple[dict, dict[str, str]]:
    """Run the curation jobs; (stats, id -> text of every kept document)."""
    stages = plan(
        results,
        [
            f"data.source={corpus / 'corpus'}",
            "data.name=generated",
            "data.license=MIT",
            "finetune=none",
            "data.validation_fraction=0",
            "data.test_fraction=0",  # every document is a training document: each leak is decontaminated
            f"data.decontaminate_against=[{corpus / 'eval.jsonl'}]",
            "data.decontamination.ngram=13",  # the schema's default for prose (the stdlib's code default is 30)
            "data.decontamination.max_documents=10",
            *overrides,
        ],
    )
    curate_dir = curated(stages)
    kept = {}
    for split in ("train", "validation", "test"):
        for row in pq.read_table(curate_dir / "data" / f"{split}.parquet").to_pylist():
            kept[row["id"]] = row["text"]
    stats = json.loads((curate_dir / "stats.json").read_text())
    stats["datasheet"] = (curate_dir / "datasheet.md").read_text()
    stats["metrics"] = json.loads((curate_dir / "manifest.json").read_text())["metrics"]
    return stats, kept


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    manifest = corpus_gen.generate(root, 700_000, seed=6)
    stats, kept = curate(
        root / "results", root, "data.filters.license.enabled=true", f"data.filters.license.allow=[{ALLOWED}]"
    )
    return manifest, stats, kept


def ids(items) -> list[str]:
    return [item if isinstance(item, str) else item["id"] for item in items]


def test_clean_documents_are_kept_and_every_injected_defect_dropped(generated):
    manifest, stats, kept = generated
    clean = manifest["clean"] + manifest["code"]
    wrongly_dropped = [i for i in clean if i not in kept]
    assert len(wrongly_dropped) <= 0.01 * len(clean), wrongly_dropped
    near = ids(manifest["near_duplicate"])
    assert len(near) >= 5 and sum(i not in kept for i in near) >= 0.95 * len(near)
    for kind in ("exact_duplicate", "junk", "leaked", "other_license"):
        assert manifest[kind] and not [i for i in ids(manifest[kind]) if i in kept], kind
    # The copies go, their originals stay.
    assert all(item["original"] in kept for item in manifest["near_duplicate"] + manifest["exact_duplicate"])


def test_each_step_counts_what_it_dropped(generated):
    manifest, stats, _ = generated
    assert stats["dropped_duplicate"] == len(manifest["exact_duplicate"])
    assert stats["dropped_near_duplicate"] >= 0.95 * len(manifest["near_duplicate"])
    assert stats["dropped_contaminated"] == len(manifest["leaked"])
    assert stats["dropped_license"] == len(manifest["other_license"])
    by_filter = Counter(item["filter"] for item in manifest["junk"])
    for name, count in by_filter.items():
        assert stats[f"dropped_{name}"] >= count, name
    for key in ("dropped_near_duplicate", "dropped_contaminated", "dropped_license", "pii_emails_replaced"):
        assert stats["metrics"][key] == stats[key] and key in stats["datasheet"]


def test_junk_lines_and_pii_are_removed_from_kept_documents(generated):
    manifest, stats, kept = generated
    for item in manifest["junk_lines"]:
        assert item["id"] in kept and not any(line in kept[item["id"]] for line in item["lines"])
    for item in manifest["pii"]:
        text = kept[item["id"]]
        assert item["email"] not in text and item["ip"] not in text and "@example." in text
    assert stats["pii_emails_replaced"] >= len(manifest["pii"]) and stats["pii_ips_replaced"] >= len(manifest["pii"])


def test_code_is_not_judged_by_prose_rules():
    """The stdlib's files pass data.profile=auto by their suffix; prose rules would drop almost all of them."""
    root, files = sources.stdlib_files()
    docs = [{"id": str(p.relative_to(root)), "text": p.read_text(), "license": "PSF-2.0"} for p in files[:40]]
    auto, prose = Counter(), Counter()
    data = schema.DataConfig(source="stdlib", profile="auto")
    kept = list(filters.apply([dict(d) for d in docs], data, auto))
    assert len(kept) == len(docs) - sum(v for k, v in auto.items() if k.startswith("dropped_") and "/" not in k)
    assert not any(k.startswith(("dropped_gopher", "dropped_c4")) for k in auto)
    data.profile = "prose"
    assert len(list(filters.apply([dict(d) for d in docs], data, prose))) < len(docs) / 2


def test_decontamination_matches_a_shared_ngram_only():
    index = dedup.NgramIndex(5)
    index.add("the quick brown fox jumps over the lazy dog")
    index.add("too short")
    index.freeze()
    assert index.texts == 2 and index.short_texts == 1
    assert index.contaminated("Once, THE quick brown fox JUMPS far away")  # case and punctuation ignored
    assert not index.contaminated("the quick brown cat jumps over a lazy dog")
    assert not index.contaminated("too short to share anything")


def test_the_repetition_rules_on_word_ids_give_datatroves_verdicts(tmp_path):
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherRepetitionFilter

    corpus_gen.generate(tmp_path, 150_000, seed=8)
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus" / "part-00000.jsonl").read_text().splitlines()]
    for text in texts[:20]:  # repeated passages, phrases and word pairs, so that each kind of rule fires
        words = text.split()
        texts += [
            " ".join(words[:40] * 3 + words[40:80]),
            " ".join(words[:7] * 12 + words[7:60]),
            " ".join(words[:2] * 20 + words[2:60]),
        ]
    theirs = GopherRepetitionFilter(language=filters.WORDS)
    ours = filters.GopherRepetitionOnIds(language=filters.WORDS)
    verdicts = [(theirs.filter(Document(text=t, id="")), ours.filter(Document(text=t, id=""))) for t in texts]
    assert all(a == b for a, b in verdicts)
    reasons = {str(a) for a, _ in verdicts}
    assert {"True", "(False, 'duplicated_5_n_grams')", "(False, 'top_2_gram')", "(False, 'top_3_gram')"} <= reasons, (
        reasons
    )


def test_an_ngram_many_training_documents_share_is_boilerplate_not_a_leak():
    header = "licensed to the python software foundation under a contributor agreement see license for details"
    leak = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches"
    index = dedup.NgramIndex(13)
    index.add(f"{header}. A test document. {leak}.")
    index.freeze()
    training = [f"{header}. Training file {i}: " + " ".join(f"word{i}_{j}" for j in range(20)) for i in range(5)]
    training.append(f"A training file that copied the test passage: {leak}.")
    assert all(index.contaminated(text) for text in training)  # every n-gram counts: all six share one
    assert index.exempt_common(training, max_documents=3) == 2  # the header's 14 words: 2 n-grams, in 5 files
    assert [index.contaminated(text) for text in training] == [False] * 5 + [True]
