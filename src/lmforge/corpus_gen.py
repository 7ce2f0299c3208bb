"""A generated corpus with known defects, and a manifest of them: ground truth for curation's filters.

    python -m lmforge.corpus_gen OUT --bytes 20000000 --seed 0

Writes OUT/corpus/part-NNNNN.jsonl (rows: id, text, license), OUT/eval.jsonl (evaluation passages, for
data.decontaminate_against) and OUT/manifest.json. Deterministic for a seed and a Python version: all its
text comes from the standard library, never from whatever else is installed.

Clean documents are of two kinds: code, the standard library's .py files (each at most once, ids ending in
.py, so data.profile=auto treats them as code), and English prose, sentences from a word-bigram chain over
the Python reference manual that ships in the standard library (pydoc_data.topics, what `help()` shows), so
prose never runs out and two documents share no long passage by chance. Injected, each after its original and listed in the manifest:

  near_duplicate     a clean document with 1% of its words replaced          -> dropped (near-duplicate)
  exact_duplicate    a clean document again                                   -> dropped (duplicate)
  junk               lorem ipsum / one line repeated / symbol soup           -> dropped (C4, Gopher rules)
  junk_lines         a clean prose document with navigation and cookie lines -> kept, those lines removed
  pii                a clean document with an email address and a public IP  -> kept, both replaced
  leaked             a clean prose document quoting a passage of eval.jsonl  -> dropped (decontamination)
  other_license      a clean prose document under LicenseRef-proprietary     -> dropped by a licence allow-list
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

from lmforge.sources import stdlib_files

log = logging.getLogger(__name__)

LICENSES = ("MIT", "Apache-2.0", "CC-BY-4.0")
OTHER_LICENSE = "LicenseRef-proprietary"
ROWS_PER_FILE = 5000
JUMP = 0.4  # the chance of a random word instead of the chain's next one
# Words that C4's line rules act on (javascript lines, lorem ipsum, cookie notices): not in clean prose.
RULE_WORDS = {"javascript", "lorem", "ipsum", "cookie", "cookies", "policy", "terms"}
JUNK_LINES = ("Home | About | Contact | Login", "Accept all cookies to continue browsing", "Share on Facebook Twitter")
EMAILS = ("jane.doe@mailhost.org", "r.smith@example-corp.net", "admin@villagepost.co.uk")
PUBLIC_IPS = ("93.184.216.34", "151.101.1.69", "140.82.112.3")


class Prose:
    """English-like sentences from a word-bigram chain over the Python reference manual's topics."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        # The same text wherever this Python runs: a chain over the venv's package metadata changed with every
        # dependency's release, and so did which generated documents the filters' tests saw.
        text = "\n".join(pydoc_topics[name] for name in sorted(pydoc_topics))
        words = [w for w in re.findall(r"[A-Za-z][a-z']*[a-z]|[.]", text) if w.lower() not in RULE_WORDS]
        self.next: dict[str, list[str]] = defaultdict(list)
        for a, b in zip(words, words[1:]):
            self.next[a.lower()].append(b.lower())
        self.starts = [b.lower() for a, b in zip(words, words[1:]) if a == "." and b != "."]
        self.vocabulary = sorted({w.lower() for w in words if w != "."})

    def sentence(self) -> str:
        while True:
            words = [self.rng.choice(self.starts)]
            while len(words) < 30:
                options = self.next.get(words[-1])
                # A random word now and then: the chain alone repeats long runs of licence boilerplate, which
                # two documents would then share by chance (decontamination's 13-grams would find them).
                word = (
                    self.rng.choice(options)
                    if options and self.rng.random() > JUMP
                    else self.rng.choice(self.vocabulary)
                )
                if not options and self.rng.random() < 0.5:
                    word = "."
                if word == ".":
                    break
                words.append(word)
            if len(words) >= 8:
                return " ".join(words).capitalize() + "."

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(4, 8)))

    def document(self) -> str:
        return "\n\n".join(self.paragraph() for _ in range(self.rng.randint(3, 8)))


def replace_words(text: str, fraction: float, vocabulary: list[str], rng: random.Random) -> str:
    """The text with `fraction` of its words (at least one) swapped for other words."""
    spans = [m.span() for m in re.finditer(r"[A-Za-z_]{3,}", text)]
    chosen = sorted(rng.sample(range(len(spans)), max(1, int(len(spans) * fraction))), reverse=True)
    for index in chosen:
        start, end = spans[index]
        text = text[:start] + rng.choice(vocabulary) + text[end:]
    return text


def insert_sentence(text: str, sentence: str, rng: random.Random) -> str:
    """The sentence as a paragraph of its own, between two paragraphs."""
    paragraphs = text.split("\n\n")
    paragraphs.insert(rng.randint(1, len(paragraphs)), sentence)
    return "\n\n".join(paragraphs)


def junk(kind: str, prose: Prose, rng: random.Random) -> str:
    if kind == "lorem_ipsum":
        return (
            prose.paragraph() + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\n\n" + prose.paragraph()
        )
    if kind == "repeated_lines":
        line = prose.sentence()
        return "\n".join([line] * 30)
    return "\n".join(" ".join(rng.choice("#*~|=^") * rng.randint(2, 6) for _ in range(12)) for _ in range(20))


JUNK = {"lorem_ipsum": "c4_lines", "repeated_lines": "gopher_repetition", "symbols": "gopher_quality"}
# Documents of each kind in every block of 100: a small corpus holds each kind, a large one the same shares.
SHARES = {
    "code": 5,
    "near_duplicate": 5,
    "exact_duplicate": 2,
    "junk": 3,
    "junk_lines": 2,
    "pii": 2,
    "leaked": 2,
    "other_license": 1,
}
SHARES["clean"] = 100 - sum(SHARES.values())


def generate(out: Path, n_bytes: int, seed: int) -> dict:
    rng = random.Random(seed)
    prose = Prose(rng)
    _, code_files = stdlib_files()
    code_files = [p for p in code_files if 2_000 < p.stat().st_size < 100_000]
    rng.shuffle(code_files)
    manifest: dict = {"seed": seed, "bytes": 0, "clean": [], "code": []}
    for kind in ("near_duplicate", "exact_duplicate", "junk", "junk_lines", "pii", "leaked", "other_license"):
        manifest[kind] = []
    evaluation = [prose.sentence() + " " + prose.sentence() for _ in range(max(20, n_bytes // 200_000))]
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in evaluation))

    rows: list[dict] = []
    part = 0
    written = 0
    recent: list[dict] = []  # clean documents an injection may copy
    start = time.monotonic()

    def emit(doc_id: str, text: str, license: str) -> None:
        nonlocal part, written, rows
        rows.append({"id": doc_id, "text": text, "license": license})
        written += len(text.encode())
        if len(rows) == ROWS_PER_FILE:
            flush()

    def flush() -> None:
        nonlocal part, rows
        if rows:
            with open(out / "corpus" / f"part-{part:05d}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            part, rows = part + 1, []

    number = 0
    kinds: list[str] = []
    while written < n_bytes:
        number += 1
        doc_id = f"doc-{number:08d}"
        license = rng.choice(LICENSES)
        if not kinds:  # each block of documents holds every kind in its share, in a shuffled order
            kinds = [kind for kind, count in SHARES.items() for _ in range(count)]
            rng.shuffle(kinds)
        kind = kinds.pop()
        if kind in ("near_duplicate", "exact_duplicate") and not recent:
            kind = "clean"
        if kind == "code" and not code_files:
            kind = "clean"
        clean = kind in ("code", "clean")  # what a later injection may copy
        if kind == "code":
            path = code_files.pop()
            doc_id = f"stdlib/{path.name}.{number}.py"
            text = path.read_text(encoding="utf-8", errors="replace")
            manifest["code"].append(doc_id)
        elif kind in ("near_duplicate", "exact_duplicate"):
            original = rng.choice(recent)
            text = original["text"]
            if kind == "near_duplicate":
                text = replace_words(text, 0.01, prose.vocabulary, rng)
            doc_id += ".py" if original["id"].endswith(".py") else ""
            manifest[kind].append({"id": doc_id, "original": original["id"]})
        elif kind == "junk":
            junk_kind = rng.choice(sorted(JUNK))
            text = junk(junk_kind, prose, rng)
            manifest["junk"].append({"id": doc_id, "kind": junk_kind, "filter": JUNK[junk_kind]})
        elif kind == "junk_lines":
            lines = rng.sample(JUNK_LINES, 2)
            text = prose.document()
            for line in lines:
                text = insert_sentence(text, line, rng)
            manifest["junk_lines"].append({"id": doc_id, "lines": lines})
        elif kind == "pii":
            email, ip = rng.choice(EMAILS), rng.choice(PUBLIC_IPS)
            # Inside chain words: scrubbed, a fixed sentence would be one 13-gram in every such document.
            words = prose.sentence()[:-1].split()
            words[len(words) // 3 : len(words) // 3] = [email]
            words[2 * len(words) // 3 : 2 * len(words) // 3] = [ip]
            text = insert_sentence(prose.document(), " ".join(words) + ".", rng)
            manifest["pii"].append({"id": doc_id, "email": email, "ip": ip})
        elif kind == "leaked":
            passage = rng.choice(evaluation)
            text = insert_sentence(prose.document(), passage, rng)
            manifest["leaked"].append({"id": doc_id, "passage": passage})
        elif kind == "other_license":
            text, license = prose.document(), OTHER_LICENSE
            manifest["other_license"].append(doc_id)
        else:
            text = prose.document()
            manifest["clean"].append(doc_id)
        if clean:
            recent = [*recent[-99:], {"id": doc_id, "text": text}]
        emit(doc_id, text, license)
        if number % 20000 == 0:
            log.info("%d documents, %.0f MB of %.0f, %.1f MB/s", number, written / 1e6, n_bytes / 1e6,
                     written / 1e6 / (time.monotonic() - start))  # fmt: skip
    flush()
    manifest["bytes"] = written
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bytes", type=int, default=10_000_000, help="text bytes to write (about)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    manifest = generate(args.out, args.bytes, args.seed)
    counts = {k: len(v) for k, v in manifest.items() if isinstance(v, list)}
    log.info("%d bytes written to %s: %s", manifest["bytes"], args.out, counts)


if __name__ == "__main__":
    main()
