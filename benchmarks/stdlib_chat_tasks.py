"""A multi-task chat set from the running interpreter's standard library, for `finetune.data` (the GPU recipe).

    python benchmarks/stdlib_chat_tasks.py OUT_DIR

writes OUT_DIR/{train,validation,test}.jsonl, one conversation per line ({"messages": [user, assistant],
"source": "<file>:<line>", "kind": ...}), and OUT_DIR/README.md (licence PSF-2.0, counts). Two kinds of
conversation, both "code -> the first sentence of its docstring":

- `function`: a public function's or method's source without its docstring -> the docstring's first sentence;
- `class`: a public class's source (at most MAX_CODE_CHARS) without its docstrings -> the class docstring's.

The files are the ones the default corpus reads (lmforge.sources.stdlib_files) and each file goes to the split
curate gives it (lmforge.curate.assign_split with conf/data/stdlib.yaml's fractions), so a file of the
pretraining corpus's test split, whose functions are the built-in task's test pairs, is never in this set's
train split. The output depends only on the interpreter's standard library: the same Python gives the same
files byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
import textwrap
from collections import Counter
from pathlib import Path

from lmforge import config, curate, sources

log = logging.getLogger(__name__)

MAX_CODE_CHARS = 1500  # about 400 tokens: long definitions would dominate the mixture's tokens
MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 4, 40
SENTENCE_END = re.compile(r"(?<=[.!?])\s")
PROMPT = "Summarize in one sentence what this Python {kind} does.\n\n```python\n{code}\n```"


def first_sentence(docstring: str) -> str | None:
    """The first sentence of the docstring's first paragraph, or None when it is too short or too long."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0]
    words = len(sentence.split())
    return sentence if MIN_SUMMARY_WORDS <= words <= MAX_SUMMARY_WORDS else None


def without_docstrings(lines: list[str], node: ast.AST) -> str | None:
    """The definition's source with every docstring inside it removed, dedented; None when nothing but
    docstrings (and `pass`/`...`) is left of its body."""
    docstring_lines = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(inner):
            first = inner.body[0]
            docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    body = [s for s in node.body if not (s.lineno in docstring_lines or isinstance(s, ast.Pass))]
    if not [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]:
        return None
    kept = [lines[n - 1] for n in range(node.lineno, node.end_lineno + 1) if n not in docstring_lines]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def conversations(relative: str, text: str, counts: Counter):
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        counts["unparsable_files"] += 1
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        kind = {ast.FunctionDef: "function", ast.AsyncFunctionDef: "function", ast.ClassDef: "class"}.get(type(node))
        if kind is None or node.name.startswith("_") or not ast.get_docstring(node):
            continue
        summary = first_sentence(ast.get_docstring(node))
        code = without_docstrings(lines, node)
        if summary is None or code is None or len(code) > MAX_CODE_CHARS:
            counts[f"{kind}_skipped"] += 1
            continue
        counts[kind] += 1
        yield {
            "messages": [
                {"role": "user", "content": PROMPT.format(kind=kind, code=code)},
                {"role": "assistant", "content": summary},
            ],
            "source": f"{relative}:{node.lineno}",
            "kind": kind,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data = config.load().data  # the default corpus's split fractions
    root, files = sources.stdlib_files()
    args.out.mkdir(parents=True, exist_ok=True)
    counts, per_split = Counter(), Counter()
    outputs = {split: open(args.out / f"{split}.jsonl", "w", encoding="utf-8") for split in curate.SPLITS}
    docs = ({"id": str(path.relative_to(root)), "path": path} for path in files)
    for doc in curate.assign_split(docs, data.validation_fraction, data.test_fraction):
        text = doc["path"].read_text(encoding="utf-8", errors="replace")
        for row in conversations(doc["id"], text, counts):
            outputs[doc["split"]].write(json.dumps(row, ensure_ascii=False) + "\n")
            per_split[doc["split"]] += 1
    for output in outputs.values():
        output.close()
    (args.out / "README.md").write_text(
        f"# stdlib chat tasks\n\nCode -> the first sentence of its docstring, from the Python standard library "
        f"({root}), by benchmarks/stdlib_chat_tasks.py. Licence: PSF-2.0 (the Python Software Foundation "
        f"License). Split by source file as lmforge's curate splits the default corpus.\n\n"
        f"Conversations per split: {dict(per_split)}; per kind: {dict(counts)}.\n"
    )
    log.info("wrote %s: %s per split, %s", args.out, dict(per_split), dict(counts))


if __name__ == "__main__":
    main()
