"""The per-document curation steps of a shard: normalization, length, quality rules, language, licence, PII.

Each step takes and yields documents (dicts with id, text, ...) and counts what it drops in `stats` under
`dropped_<step>` (and PII replacements under `pii_<kind>`). The quality rules are datatrove's blocks, called
in-process on datatrove Documents: GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter (line rules,
which also rewrite the text) and PIIFormatter. Prose rules apply to prose documents only (data.profile): on
code they would drop nearly every file (no stop words, no terminal punctuation, curly brackets).

datatrove splits words with spaCy or NLTK, neither of which is installed here (NLTK's punkt needs a
download): the blocks get `RegexWordTokenizer` instead, datatrove's WordTokenizer interface over a regex.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.word_tokenizers import WordTokenizer

from lmforge import dedup, stage
from lmforge.schema import DataConfig
from lmforge.sources import CODE_SUFFIXES

log = logging.getLogger(__name__)


class RegexWordTokenizer(WordTokenizer):
    """Words are runs of word characters or of other non-space characters; a sentence ends at . ! ? and space."""

    WORD = re.compile(r"\w+|[^\w\s]+")
    SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (part.strip() for part in self.SENTENCE_END.split(text)) if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in self.SENTENCE_END.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


WORDS = RegexWordTokenizer()


class GopherRepetitionOnIds(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter, its n-gram rules computed on word ids instead of joined strings.

    The line and paragraph rules are the parent's own; the top n-gram and duplicated n-gram rules are the
    parent's, in its order, with its ties (the first most common n-gram) and its non-overlapping scan, but on
    hashed windows of word ids: the parent joins every n-gram of 2 to 10 words into a new string, which made
    it the slowest step by far (benchmarks/README.md).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ngram_rules = (self.top_n_grams, self.dup_n_grams)
        self.top_n_grams = self.dup_n_grams = ()  # the parent's filter: the line and paragraph rules only

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        verdict = super().filter(doc)
        if verdict is not True:
            return verdict
        words = WORDS.word_tokenize(doc.text)
        index: dict[str, int] = {}
        ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.uint64, count=len(words))
        ends = np.concatenate(([0], np.cumsum([len(w) for w in words], dtype=np.int64)))
        top_rules, dup_rules = self.ngram_rules
        for n, fraction in top_rules:
            if len(words) < n:
                continue
            _, first, counts = np.unique(dedup.window_hashes(ids, n), return_index=True, return_counts=True)
            at = first[counts == counts.max()].min()  # Counter.most_common: the first of the most common
            chars = (ends[at + n] - ends[at] + n - 1) * counts.max()  # joined with spaces
            if chars / len(doc.text) > fraction:
                return False, f"top_{n}_gram"
        lengths = np.diff(ends)
        for n, fraction in dup_rules:
            keys = dedup.window_hashes(ids, n)
            if not len(keys):
                continue
            # The scan counts only windows seen before, without overlaps: at most the words those cover.
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            repeats = np.flatnonzero(first[inverse] != np.arange(len(keys)))
            cover = np.zeros(len(words) + 1, dtype=np.int64)
            np.add.at(cover, repeats, 1)
            np.add.at(cover, repeats + n, -1)
            if lengths[np.cumsum(cover[:-1]) > 0].sum() / len(doc.text) <= fraction:
                continue
            if self.repeated_chars(keys.tolist(), (ends[n:] - ends[:-n]).tolist(), n) / len(doc.text) > fraction:
                return False, f"duplicated_{n}_n_grams"
        return True

    @staticmethod
    def repeated_chars(keys: list[int], window_chars: list[int], n: int) -> int:
        """The parent's scan: a window seen before counts (its words joined without spaces) and is skipped."""
        seen, repeated, i, last = set(), 0, 0, len(keys)
        while i < last:
            if keys[i] in seen:
                repeated += window_chars[i]
                i += n
            else:
                seen.add(keys[i])
                i += 1
        return repeated


def normalize(docs: Iterable[dict], form: str) -> Iterator[dict]:
    for doc in docs:
        doc["text"] = unicodedata.normalize(form, doc["text"])
        yield doc


def filter_length(docs: Iterable[dict], min_chars: int, max_chars: int, stats: Counter) -> Iterator[dict]:
    for doc in docs:
        n = len(doc["text"].strip())
        reason = "empty" if n == 0 else "too_short" if n < min_chars else "too_long" if n > max_chars else None
        if reason:
            stats[f"dropped_{reason}"] += 1
            continue
        yield doc


def is_code(doc: dict, profile: str) -> bool:
    if profile != "auto":
        return profile == "code"
    return doc["id"].lower().endswith(CODE_SUFFIXES)


def datatrove_filter(block, name: str, profile: str, stats: Counter) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A datatrove filter as a step on prose documents: the block may rewrite the text (C4's line rules)."""

    def step(docs: Iterable[dict]) -> Iterator[dict]:
        for doc in docs:
            if is_code(doc, profile):
                yield doc
                continue
            trove = Document(text=doc["text"], id=doc["id"])
            verdict = block.filter(trove)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not keep:
                stats[f"dropped_{name}"] += 1
                if reason:
                    stats[f"dropped_{name}/{reason}"] += 1
                continue
            if trove.text != doc["text"]:
                if trove.text.split() != doc["text"].split():  # lines removed, not only blank lines
                    stats[f"{name}_changed_documents"] += 1
                doc["text"] = trove.text
            yield doc

    return step


def language_filter(model_path: str, languages: list[str], min_score: float, stats: Counter):
    """fastText language ID on a user-provided model file (lid.176.bin): kept when the top label is allowed."""
    import fasttext

    try:
        model = fasttext.load_model(model_path)
    except ValueError as err:
        raise stage.StageError(
            f"data.filters.language.model_path={model_path!r} is not a fastText model: {err}"
        ) from None
    allowed = {f"__label__{language}" for language in languages}

    def step(docs: Iterable[dict]) -> Iterator[dict]:
        for doc in docs:
            [label], [score] = model.predict(doc["text"].replace("\n", " "), k=1)
            if label not in allowed or score < min_score:
                stats["dropped_language"] += 1
                continue
            yield doc

    return step


def license_filter(allow: list[str], stats: Counter):
    allowed = set(allow)

    def step(docs: Iterable[dict]) -> Iterator[dict]:
        for doc in docs:
            if doc["license"] not in allowed:
                stats["dropped_license"] += 1
                continue
            yield doc

    return step


def pii_scrubber(emails: bool, ips: bool, stats: Counter):
    """datatrove's PIIFormatter, counting the replacements of each kind (its replacers' own regexes)."""
    formatter = PIIFormatter(remove_emails=emails, remove_ips=ips)
    # Each kind with a cheap test that a text may hold one: most texts have neither, and the regexes are slow.
    replacers = [("emails", formatter.emails_replacer, re.compile("@"))] * emails
    replacers += [("ips", formatter.ip_replacer, re.compile(r"\d\.\d"))] * ips

    def step(docs: Iterable[dict]) -> Iterator[dict]:
        for doc in docs:
            text = doc["text"]
            for kind, replacer, may_hold in replacers:
                if not may_hold.search(text):
                    continue
                # The regex finds candidates, the replacer's validator (public IPs only) decides.
                found = sum(
                    1
                    for m in replacer.regex.finditer(text)
                    if replacer.validator is None or replacer.validator(m.group(0))
                )
                if found:
                    stats[f"pii_{kind}_replaced"] += found
                    stats["pii_documents"] += 1
                    text = replacer.replace(text)
            doc["text"] = text
            yield doc

    return step


Step = Callable[[Iterable[dict]], Iterator[dict]]


def steps(data_cfg: DataConfig, stats: Counter) -> list[tuple[str, Step]]:
    """The configured steps by name, in order: the text is final (normalized, line-filtered, scrubbed) after them."""
    f, profile = data_cfg.filters, data_cfg.profile
    chain = [
        ("normalize", lambda docs: normalize(docs, data_cfg.normalization)),
        ("length", lambda docs: filter_length(docs, data_cfg.min_chars, data_cfg.max_chars, stats)),
    ]
    if data_cfg.profile != "code":
        if f.gopher_repetition.enabled:
            rep = f.gopher_repetition
            block = GopherRepetitionOnIds(
                dup_line_frac=rep.dup_line_frac,
                dup_para_frac=rep.dup_para_frac,
                dup_line_char_frac=rep.dup_line_char_frac,
                dup_para_char_frac=rep.dup_para_char_frac,
                language=WORDS,
            )
            chain.append(("gopher_repetition", datatrove_filter(block, "gopher_repetition", profile, stats)))
        if f.gopher_quality.enabled:
            q = f.gopher_quality
            block = GopherQualityFilter(
                min_doc_words=q.min_doc_words,
                max_doc_words=q.max_doc_words,
                min_avg_word_length=q.min_avg_word_length,
                max_avg_word_length=q.max_avg_word_length,
                max_symbol_word_ratio=q.max_symbol_word_ratio,
                max_bullet_lines_ratio=q.max_bullet_lines_ratio,
                max_ellipsis_lines_ratio=q.max_ellipsis_lines_ratio,
                max_non_alpha_words_ratio=q.min_alpha_words_ratio,  # datatrove's name for a minimum
                min_stop_words=q.min_stop_words,
                language=WORDS,
            )
            chain.append(("gopher_quality", datatrove_filter(block, "gopher_quality", profile, stats)))
        if f.c4_lines.enabled:
            c4 = f.c4_lines
            block = C4QualityFilter(
                min_num_sentences=c4.min_num_sentences,
                min_words_per_line=c4.min_words_per_line,
                max_word_length=c4.max_word_length,
                filter_curly_bracket=c4.filter_curly_bracket,
                language=WORDS,
            )
            chain.append(("c4_lines", datatrove_filter(block, "c4_lines", profile, stats)))
    if f.language.enabled:
        language = f.language
        chain.append(("language", language_filter(language.model_path, language.languages, language.min_score, stats)))
    if f.license.enabled:
        chain.append(("license", license_filter(f.license.allow, stats)))
    if f.pii.enabled:
        chain.append(("pii", pii_scrubber(f.pii.emails, f.pii.ips, stats)))
    return chain


def apply(docs: Iterable[dict], data_cfg: DataConfig, stats: Counter) -> Iterator[dict]:
    for _, step in steps(data_cfg, stats):
        docs = step(docs)
    yield from docs
