"""references.parquet: one row per reference (formats/references.md, STYLE §5.3).

An explicit schema, zstd compression, fixed row groups, and one schema-metadata key `m3compile`
holding {format, format_version}. Rows are written incrementally, so memory stays one row group.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from m3compile.errors import M3Error

FORMAT, FORMAT_VERSION = "m3-references", 1
FILE_NAME = "references.parquet"
ROW_GROUP_SIZE = 4096  # rows per row group (fixed, so the bytes do not depend on the batch size)

SCHEMA = pa.schema([
    pa.field("ref_id", pa.int64(), nullable=False),  # primary key: shard ref_ids, FAISS ids
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # file path relative to the corpus root
    pa.field("index", pa.int32(), nullable=False),  # position of the reference in its document
    pa.field("char_start", pa.int64(), nullable=False),  # span in the document text (code points)
    pa.field("char_end", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("n_kept", pa.int32(), nullable=False),  # K: tokens kept per layer and kv head
    pa.field("shard", pa.string(), nullable=False),  # shard file holding the memory
    pa.field("byte_offset", pa.int64(), nullable=False),  # frame start inside the shard's kv tensor
    pa.field("byte_length", pa.int64(), nullable=False),
    pa.field("quant_rel_err", pa.float32(), nullable=False),  # ||x - x̂|| / ||x|| over keys and values
    pa.field("quant_max_err", pa.float32(), nullable=False),  # max |x - x̂|
    pa.field("ref_key", pa.string(), nullable=False),  # sha256 content key (hex) of the memory, as in the shard
    pa.field("doc_sha256", pa.string(), nullable=False),  # sha256 of the document text the reference was cut from
])


def _schema_with_metadata() -> pa.Schema:
    meta = {"m3compile": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}, sort_keys=True)}
    return SCHEMA.with_metadata(meta)


class ReferenceWriter:
    """Appends rows (dicts with SCHEMA's columns) to references.parquet; `close()` finishes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: list[dict] = []
        self._writer = pq.ParquetWriter(str(self.path), _schema_with_metadata(), compression="zstd")
        self.n_rows = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) == ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._writer.schema),
                                     row_group_size=ROW_GROUP_SIZE)
            self.n_rows += len(self._rows)
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def check_metadata(path: Path) -> pq.FileMetaData:
    """Read the footer only; refuse a foreign file or a newer format version."""
    try:
        meta = pq.read_metadata(str(path))
        raw = (meta.metadata or {}).get(b"m3compile")
        info = json.loads(raw) if raw else {}
    except (OSError, pa.ArrowException, ValueError) as e:  # ValueError: undecodable metadata
        raise M3Error(f"cannot read {path}: {e}; the file is damaged or missing") from None
    if info.get("format") != FORMAT:
        raise M3Error(f"{path} is not an m3compile references table (no m3compile metadata)")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise M3Error(f"{path} has format_version {info['format_version']}, newer than this m3compile "
                      f"reads ({FORMAT_VERSION}); upgrade m3compile")
    return meta


def write_references(path: Path, rows: list[dict]) -> None:
    with ReferenceWriter(path) as w:
        for row in rows:
            w.add(row)


def read_references(path: Path, columns: list[str] | None = None) -> pa.Table:
    check_metadata(path)
    try:
        return pq.read_table(str(path), columns=columns)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None
