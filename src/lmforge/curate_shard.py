"""Stage 1a, one curation shard: shard `cfg.shard` of `data.shards` of the corpus -> filtered documents.

Reads its part of the source as a stream (lmforge.sources), runs the per-document steps (lmforge.filters:
normalization, length, Gopher and C4 rules on prose, language ID, licence allow-list, PII scrubbing), and
writes the surviving documents with their sha256 and MinHash signature, batch by batch, so its memory is
bounded by data.batch_size, not by the corpus. The curate stage merges the shards.

Outputs:
  docs.parquet   id, text, sha256, n_bytes, source_sha256, license, order, minhash (bands x rows uint32)
  stats.json     rows read, broken rows, and what each step dropped or changed
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge import dedup, filters, sources, stage
from lmforge.schema import StageConfig

log = logging.getLogger(__name__)


def schema(signature_size: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("sha256", pa.string()),
            ("n_bytes", pa.int64()),
            ("source_sha256", pa.string()),
            ("license", pa.string()),
            ("order", pa.int64()),
            ("minhash", pa.list_(pa.uint32(), signature_size)),
        ]
    )


def batches(docs: Iterable[dict], size: int) -> Iterator[list[dict]]:
    docs = iter(docs)
    while batch := list(islice(docs, size)):
        yield batch


def main(cfg: StageConfig, out: Path, tracker) -> dict:
    data_cfg = cfg.data
    shard, shards = cfg.shard or 0, data_cfg.shards
    stats = Counter(rows_read=0, broken_rows=0, skipped_files=0, skipped_hidden_files=0)  # listed also when 0
    docs = sources.read_source(data_cfg, stats, shard, shards)
    docs = ({**doc, "license": doc["license"] or data_cfg.license} for doc in docs)
    docs = filters.apply(docs, data_cfg, stats)
    sign = dedup.Signer(data_cfg.dedup, filters.WORDS)
    docs_schema = schema(sign.size)
    written = n_bytes = 0
    progress = stage.Progress(
        log, f"shard {shard + 1}/{shards}: read", sources.shard_megabytes(data_cfg, shards), " MB"
    )
    with pq.ParquetWriter(out / "docs.parquet", docs_schema) as writer:
        for batch in batches(docs, data_cfg.batch_size):
            for doc in batch:
                encoded = doc["text"].encode()
                doc["sha256"] = hashlib.sha256(encoded).hexdigest()
                doc["n_bytes"] = len(encoded)
                doc["minhash"] = sign(doc["text"])
            writer.write_table(pa.Table.from_pylist(batch, schema=docs_schema))
            written += len(batch)
            n_bytes += sum(doc["n_bytes"] for doc in batch)
            progress(stats["bytes_read"] / 1e6, f"({written} documents kept of {stats['rows_read']} read)")
    if stats["broken_rows"]:
        log.warning("skipped %d broken rows of %d", stats["broken_rows"], stats["rows_read"])
    summary = {k: int(v) for k, v in sorted(stats.items())}
    summary.update(shard=shard, shards=shards, documents=written, bytes=n_bytes)
    stage.write_json(out / "stats.json", summary)
    return summary


if __name__ == "__main__":
    stage.run(main)
