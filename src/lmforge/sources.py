"""Reading a corpus as a stream of documents, one shard of it at a time.

A source is the embedded stdlib, local .jsonl/.parquet/.txt/.py/.md files (a file or a directory), or a Hub
dataset read from the local HF cache. Nothing is read whole: JSON lines one by one, Parquet in record
batches, a Hub dataset with `streaming=True`.

Shard `i` of `n` reads every n-th text file, the lines starting in the i-th byte range of each JSON-lines
file, every n-th row group of each Parquet file, and every n-th row of a Hub dataset; together the shards
read every document once. Each document carries `order`, its position in the whole source (file number,
row), the same however the source is sharded: deduplication keeps the earliest, so any shard count keeps the
same documents.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from lmforge import stage
from lmforge.schema import DataConfig

log = logging.getLogger(__name__)

STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
ROW_BITS = 40  # order = file number << ROW_BITS | row within the file


def position(file_number: int, row: int) -> int:
    return file_number << ROW_BITS | row


def document(doc_id: str, text: str, source_bytes: bytes, order: int, license: str | None) -> dict:
    return {
        "id": doc_id,
        "text": text,
        "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
        "order": order,
        "license": license,
    }


def row_license(row: dict, field: str) -> str | None:
    value = row.get(field)
    return value if isinstance(value, str) else None


# -- files -------------------------------------------------------------------------------------------------


def read_text_file(path: Path, doc_id: str, order: int, stats: Counter) -> Iterator[dict]:
    """A whole file is one document; a leading UTF-8 BOM is dropped, a file that is not UTF-8 is a broken row."""
    raw = path.read_bytes()
    stats["rows_read"] += 1
    stats["bytes_read"] += len(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        stats["broken_rows"] += 1
        log.warning("skipping broken file %s: %s", path, err)
        return
    yield document(doc_id, text, raw, order, None)


def byte_range(path: Path, shard: int, shards: int) -> tuple[int, int]:
    size = path.stat().st_size
    return size * shard // shards, size * (shard + 1) // shards


def read_jsonl(
    path: Path, data_cfg: DataConfig, file_number: int, stats: Counter, shard: int = 0, shards: int = 1
) -> Iterator[dict]:
    """The lines that start in this shard's byte range; a line that is not UTF-8, or not a JSON object with a
    string text field, is skipped. Lines are decoded one by one, so undecodable bytes break only their own row.
    """
    text_field = data_cfg.text_field
    start, end = byte_range(path, shard, shards)
    rows = kept = 0
    with open(path, "rb") as f:
        number = 1
        if start:
            # The line that straddles `start` belongs to the previous shard; count the lines before it.
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
            offset = f.tell()
            f.seek(0)
            number += sum(block.count(b"\n") for block in iter(lambda: f.read(min(1 << 20, offset - f.tell())), b""))
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            number += 1
            if not line.strip():
                continue
            rows += 1
            stats["rows_read"] += 1
            stats["bytes_read"] += len(line)
            try:
                row = json.loads(line.decode("utf-8"))
                text = row[text_field]
                if not isinstance(text, str):
                    raise TypeError(f"{text_field} is {type(text).__name__}")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                stats["broken_rows"] += 1
                log.warning("skipping broken row %s:%d: %s", path, number - 1, err)
                continue
            kept += 1
            doc_id = str(row.get("id", f"{path.name}:{number - 1}"))
            yield document(
                doc_id, text, line, position(file_number, number - 1), row_license(row, data_cfg.license_field)
            )
    if rows and not kept:
        log.warning("none of the %d rows of %s has a string field %r: check data.text_field", rows, path, text_field)


def require_text_column(source: str, column_names: list[str], text_field: str) -> None:
    """A table without the text column is a config mistake, not a table of broken rows: stop and say so."""
    if text_field not in column_names:
        raise stage.StageError(
            f"{source} has no column {text_field!r} (data.text_field); its columns are {column_names}: "
            f"set data.text_field to one of them"
        )


def read_parquet(
    path: Path, data_cfg: DataConfig, file_number: int, stats: Counter, shard: int = 0, shards: int = 1
) -> Iterator[dict]:
    """This shard's row groups of a Parquet file, in record batches of the text, id and licence columns only."""
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    require_text_column(str(path), names, data_cfg.text_field)
    wanted = [c for c in dict.fromkeys([data_cfg.text_field, "id", data_cfg.license_field]) if c in names]
    groups = [g for g in range(parquet.num_row_groups) if g % shards == shard]
    first_rows = [0]
    for g in range(parquet.num_row_groups):
        first_rows.append(first_rows[-1] + parquet.metadata.row_group(g).num_rows)

    def rows() -> Iterator[tuple[int, dict]]:
        for g in groups:
            index = first_rows[g]
            for batch in parquet.iter_batches(batch_size=data_cfg.batch_size, row_groups=[g], columns=wanted):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1

    yield from from_rows(rows(), str(path), path.name, file_number, data_cfg, stats)


def from_rows(
    rows: Iterable[tuple[int, dict]], source: str, id_prefix: str, file_number: int, data_cfg: DataConfig, stats
) -> Iterator[dict]:
    """(row number, row) of a table; a null or non-string text is a broken row, counted in one line per table."""
    broken = 0
    for index, row in rows:
        stats["rows_read"] += 1
        text = row.get(data_cfg.text_field)
        if not isinstance(text, str):
            broken += 1
            continue
        stats["bytes_read"] += len(text.encode())
        doc_id = str(row.get("id", f"{id_prefix}:{index}"))
        license = row_license(row, data_cfg.license_field)
        yield document(doc_id, text, text.encode(), position(file_number, index), license)
    if broken:
        stats["broken_rows"] += broken
        log.warning("skipping %d broken rows of %s: %r is null or not a string", broken, source, data_cfg.text_field)


def source_files(directory: Path, stats: Counter) -> list[Path]:
    """The files of a source directory that have a reader, in name order.

    Hidden files and directories (.git/, .DS_Store) are skipped and only counted; other files without a reader are
    counted and named in the log, since they may be data the researcher expected to be read.
    """
    files, unsupported = [], []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in file.relative_to(directory).parts):
            stats["skipped_hidden_files"] += 1
        elif file.suffix.lower() in SUFFIXES:
            files.append(file)
        else:
            unsupported.append(str(file.relative_to(directory)))
    if unsupported:
        stats["skipped_files"] += len(unsupported)
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        log.warning(
            "skipping %d files of %s with no reader (not %s): %s%s",
            len(unsupported),
            directory,
            ", ".join(SUFFIXES),
            ", ".join(unsupported[:5]),
            more,
        )
    return files


def read_files(root: Path, files: list[Path], data_cfg: DataConfig, stats: Counter, shard: int, shards: int):
    for number, file in enumerate(files):
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            if number % shards == shard:
                doc_id = str(file.relative_to(root)) if root.is_dir() else file.name
                yield from read_text_file(file, doc_id, position(number, 0), stats)
        else:
            yield from TABLE_READERS[suffix](file, data_cfg, number, stats, shard, shards)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard library .py files, without test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return root, files


# -- the Hub -----------------------------------------------------------------------------------------------


def is_local(source: str) -> bool:
    """A path, not a Hub name: absolute, relative (./, ../, ~), a known suffix, or a name that exists here."""
    return (
        source.startswith(("/", ".", "~"))
        or Path(source).suffix.lower() in SUFFIXES
        or Path(source).exists()
        or source.count("/") > 1
    )


def hub_cache_dir() -> Path:
    """Where an offline `load_dataset(name)` finds a Hub dataset: the datasets cache (HF_DATASETS_CACHE)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()


def cached_hub_dataset(name: str) -> Path | None:
    """The prepared copy of Hub dataset `name` that `load_dataset` left in the datasets cache, or None.

    Offline, datasets finds only such a copy (<owner>___<name>/<config>/<version>/<hash>/), not a `hf download`
    snapshot in the hub cache: point data.source at that snapshot's directory of files instead.
    """
    from datasets.naming import camelcase_to_snakecase

    *owner, dataset = name.split("/")
    directory = hub_cache_dir() / "___".join([*owner, camelcase_to_snakecase(dataset)])
    return directory if any(p.is_dir() for p in directory.glob("*/*/*")) else None


def read_hub(data_cfg: DataConfig, stats: Counter, shard: int, shards: int) -> Iterator[dict]:
    """Every n-th row of a Hub dataset, streamed (each shard streams it all and keeps its rows)."""
    import datasets

    try:
        dataset = datasets.load_dataset(data_cfg.source, data_cfg.subset, split=data_cfg.split, streaming=True)
    except Exception as err:  # datasets raises many kinds (offline, no such split, no such config)
        raise stage.StageError(
            f"data.source={data_cfg.source!r} (subset {data_cfg.subset!r}, split {data_cfg.split!r}) cannot be "
            f"streamed from the HF cache {hub_cache_dir()}: {type(err).__name__}: {err}"
        ) from None
    names = list(dataset.column_names or [])
    if names:
        require_text_column(data_cfg.source, names, data_cfg.text_field)
    rows = ((index, row) for index, row in enumerate(dataset) if index % shards == shard)
    yield from from_rows(rows, data_cfg.source, data_cfg.source, 0, data_cfg, stats)


def shard_megabytes(data_cfg: DataConfig, shards: int) -> float | None:
    """About how many MB of the source one shard reads (of a Parquet file, its row groups' uncompressed size);
    None for a Hub dataset, whose size is not known before it is streamed."""
    if data_cfg.source == "stdlib":
        _, files = stdlib_files()
    else:
        path = Path(data_cfg.source).expanduser()
        if not path.exists():
            return None
        files = source_files(path, Counter()) if path.is_dir() else [path]

    def size(file: Path) -> int:
        if file.suffix.lower() == ".parquet":
            metadata = pq.ParquetFile(file).metadata
            return sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
        return file.stat().st_size

    return sum(size(f) for f in files) / shards / 1e6


# -- one shard of any source -------------------------------------------------------------------------------


def read_source(data_cfg: DataConfig, stats: Counter, shard: int = 0, shards: int = 1) -> Iterator[dict]:
    """Shard `shard` of `shards` of the configured source, as documents (id, text, source_sha256, order, license)."""
    source = data_cfg.source
    if source == "stdlib":
        root, files = stdlib_files()
        yield from read_files(root, files, data_cfg, stats, shard, shards)
        return
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise stage.StageError(f"data.source={source!r}: curate reads {', '.join(SUFFIXES)} files, not {path.suffix!r}")
    if path.exists():
        files = source_files(path, stats) if path.is_dir() else [path]
        yield from read_files(path, files, data_cfg, stats, shard, shards)
        return
    if is_local(source):
        raise stage.StageError(f"data.source={source!r}: no such file or directory")
    # A Hub dataset name; compute nodes need it in the local HF cache (HF_DATASETS_OFFLINE=1).
    yield from read_hub(data_cfg, stats, shard, shards)


TABLE_READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet}
TEXT_SUFFIXES = (".txt", ".py", ".md")  # a whole file is one document
SUFFIXES = (*TABLE_READERS, *TEXT_SUFFIXES)
CODE_SUFFIXES = (".py",)  # data.profile=auto: documents from these files are code
