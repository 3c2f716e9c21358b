"""references.parquet: one row per reference (formats/references.md, STYLE §5.3).

An explicit schema, zstd compression, fixed row groups, and one schema-metadata key `m3compile`
holding {format, format_version}. Rows are written incrementally, so memory stays one row group.
"""

import json
import os
import tempfile
from array import array
from pathlib import Path

import numpy as np
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


class RefColumns:
    """Reference rows (SCHEMA's columns) held as columns: a compile's plan in ~150 bytes a reference
    of memory (a dict a row took ~1 KB: issue 16, bounded memory). Rows are appended once, read back
    as dicts (`row`), and their frame fields set once encoded (`locate`). Strings a document or a
    shard shares (doc_id, source, doc_sha256, shard) are stored once, content keys as 32 raw bytes.
    Each row's token ids (int32) and text (UTF-8) are one record of a byte stream: given
    `spill_dir`, an anonymous temporary file there (gone when closed or when the process dies), so
    that the biggest columns cost no memory; else a bytearray."""

    INTERNED = ("doc_id", "source", "doc_sha256", "shard")
    INTS = {"ref_id": "q", "index": "i", "char_start": "q", "char_end": "q", "n_tokens": "i", "n_kept": "i",
            "byte_offset": "q", "byte_length": "q"}
    FLOATS = ("quant_rel_err", "quant_max_err")  # float64: the encoder's values, rounded to float32 on write
    LOCATION = ("n_kept", "shard", "byte_offset", "byte_length", "quant_rel_err", "quant_max_err")
    READ_BYTES = 1 << 24  # the most one read of consecutive records takes

    def __init__(self, spill_dir: Path | None = None):
        self._ints = {k: array(t) for k, t in self.INTS.items()}
        self._floats = {k: array("d") for k in self.FLOATS}
        self._codes = {k: array("i") for k in self.INTERNED}
        self._strings: dict[str, list[str]] = {k: [] for k in self.INTERNED}
        self._lookup: dict[str, dict[str, int]] = {k: {} for k in self.INTERNED}
        self._ends = array("q")  # end of each row's record in the stream (token ids, then text)
        self._buf = bytearray() if spill_dir is None else None
        self._file = None if spill_dir is None else tempfile.TemporaryFile(dir=spill_dir, prefix=".plan-",
                                                                           suffix=".tmp")
        self._dirty = False  # the file's write buffer holds records not yet readable by pread
        self._keys = bytearray()

    def __len__(self) -> int:
        return len(self._keys) // 32

    def close(self) -> None:
        """Drop the spilled records (the file is anonymous: a killed process leaves nothing)."""
        if self._file is not None:
            self._file.close()

    def _code(self, name: str, value: str) -> int:
        table = self._lookup[name]
        code = table.get(value)
        if code is None:
            code = table[value] = len(self._strings[name])
            self._strings[name].append(value)
        return code

    def append(self, row: dict) -> int:
        """Add a row (SCHEMA's columns; frame fields may be missing until `locate`); its position."""
        key = bytes.fromhex(row["ref_key"])
        assert len(key) == 32, row["ref_key"]
        assert len(row["token_ids"]) == row["n_tokens"], (len(row["token_ids"]), row["n_tokens"])
        get = row.get
        for k, col in self._ints.items():
            col.append(get(k, 0))
        for k, col in self._floats.items():
            col.append(get(k, 0.0))
        for k, col in self._codes.items():
            col.append(self._code(k, get(k, "")))
        record = array("i", row["token_ids"]).tobytes() + row["text"].encode("utf-8")
        if self._file is None:
            self._buf += record
        else:
            self._file.write(record)
            self._dirty = True
        self._ends.append((self._ends[-1] if self._ends else 0) + len(record))
        self._keys += key
        return len(self) - 1

    def _read(self, lo: int, hi: int) -> bytes:
        if self._file is None:
            return bytes(self._buf[lo:hi])
        if self._dirty:
            self._file.flush()
            self._dirty = False
        parts, at = [], lo
        while at < hi:  # pread may return less than asked (past 2 GiB on Linux, or a signal)
            got = os.pread(self._file.fileno(), hi - at, at)
            if not got:
                raise OSError(f"the plan's spill file ends at byte {at}, before {hi}")
            parts.append(got)
            at += len(got)
        return b"".join(parts)

    def _records(self, positions) -> list[bytes]:
        """The records of rows at `positions`: ascending runs that are mostly theirs are read at
        once, at most READ_BYTES at a time; other records one by one."""
        ends = self._ends
        spans = [(ends[p - 1] if p else 0, ends[p]) for p in positions]
        out, k = [], 0
        while k < len(spans):
            lo, j, used = spans[k][0], k + 1, spans[k][1] - spans[k][0]
            while j < len(spans) and spans[j - 1][1] <= spans[j][0] and spans[j][1] - lo <= self.READ_BYTES:
                used += spans[j][1] - spans[j][0]
                j += 1
            hi = spans[j - 1][1]
            if hi - lo <= 2 * used:
                block = self._read(lo, hi)
                out += [block[b - lo:e - lo] for b, e in spans[k:j]]
            else:
                out += [self._read(b, e) for b, e in spans[k:j]]
            k = j
        return out

    def _split(self, i: int, record: bytes) -> tuple[array, str]:
        """A record as (token ids, text)."""
        n = 4 * self._ints["n_tokens"][i]
        ids = array("i")
        ids.frombytes(record[:n])
        return ids, record[n:].decode("utf-8")

    def locate(self, i: int, **fields) -> None:
        """Set row i's frame fields (LOCATION: where its memory lies, and its quantization errors)."""
        for k, v in fields.items():
            assert k in self.LOCATION, k
            if k in self._ints:
                self._ints[k][i] = v
            elif k in self._floats:
                self._floats[k][i] = v
            else:
                self._codes[k][i] = self._code(k, v)

    def key(self, i: int) -> bytes:
        """Row i's content key, raw (its ref_key is the hex of it)."""
        return bytes(self._keys[32 * i:32 * i + 32])

    def raw_keys(self) -> bytes:
        """Every row's content key, 32 raw bytes each, in row order (a copy)."""
        return bytes(self._keys)

    def token_ids(self, i: int) -> array:
        return self._split(i, self._records([i])[0])[0]

    def row(self, i: int, record: bytes | None = None) -> dict:
        """Row i as a dict of SCHEMA's columns, in its order (token_ids an int32 array, as the plan
        holds them); `record`: its record, when read already (_records)."""
        ints, codes, strings, floats = self._ints, self._codes, self._strings, self._floats
        ids, text = self._split(i, self._records([i])[0] if record is None else record)
        return {"ref_id": ints["ref_id"][i], "doc_id": strings["doc_id"][codes["doc_id"][i]],
                "source": strings["source"][codes["source"][i]], "index": ints["index"][i],
                "char_start": ints["char_start"][i], "char_end": ints["char_end"][i], "n_tokens": ints["n_tokens"][i],
                "token_ids": ids, "text": text, "n_kept": ints["n_kept"][i],
                "shard": strings["shard"][codes["shard"][i]], "byte_offset": ints["byte_offset"][i],
                "byte_length": ints["byte_length"][i], "quant_rel_err": floats["quant_rel_err"][i],
                "quant_max_err": floats["quant_max_err"][i], "ref_key": self.key(i).hex(),
                "doc_sha256": strings["doc_sha256"][codes["doc_sha256"][i]]}

    def rows(self, positions) -> list[dict]:
        """The rows at `positions`, their records read together."""
        return [self.row(p, r) for p, r in zip(positions, self._records(positions))]

    def ref_ids(self) -> array:
        return self._ints["ref_id"]

    def column(self, name: str, positions) -> "list | np.ndarray":
        """One column's values at `positions`, without building the rows: a numpy array for the
        numbers (8 bytes a row, not a list of int objects: issue 16), else a list."""
        if name in self._ints:
            col = self._ints[name]
            return np.frombuffer(col, dtype=np.dtype(col.typecode))[np.asarray(positions, dtype=np.int64)]
        elif name in self._floats:
            return np.frombuffer(self._floats[name], dtype=np.float64)[np.asarray(positions, dtype=np.int64)]
        elif name in self._codes:
            codes, strings = self._codes[name], self._strings[name]
            return [strings[codes[p]] for p in positions]
        elif name in ("text", "token_ids"):
            k = name == "text"
            return [self._split(p, r)[k] for p, r in zip(positions, self._records(positions))]
        return [self.row(p)[name] for p in positions]


class Rows:
    """A sequence of RefColumns rows by position (a plan's rows in ref id order, or its new rows):
    rows come out as dicts, and `locate(j, ...)` writes the frame fields of the j-th back."""

    def __init__(self, store: RefColumns, positions):
        self.store, self.positions = store, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return Rows(self.store, self.positions[j])
        return self.store.row(self.positions[j])

    def __iter__(self):
        for k in range(0, len(self.positions), 4096):  # records read 4096 rows at a time
            yield from self.store.rows(self.positions[k:k + 4096])

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def locate(self, j: int, **fields) -> None:
        self.store.locate(self.positions[j], **fields)

    def key(self, j: int) -> bytes:
        """The j-th row's content key, raw (its ref_key is the hex of it)."""
        return self.store.key(self.positions[j])

    def token_ids(self, j: int) -> array:
        return self.store.token_ids(self.positions[j])


def columns(rows, names) -> dict[str, list]:
    """{name: values} over rows: a Rows view's columns read directly (numbers as numpy arrays), or
    a list of dicts' (lists)."""
    if isinstance(rows, Rows):
        return {n: rows.store.column(n, rows.positions) for n in names}
    return {n: [r[n] for r in rows] for n in names}


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


def read_reference_rows(path: Path, spill_dir: Path | None = None) -> Rows:
    """references.parquet as plan rows (RefColumns: token ids and texts spilled to `spill_dir`),
    read a row group at a time: what an incremental compile holds of its kb (issue 16)."""
    check_metadata(path)
    store = RefColumns(spill_dir)
    try:
        for batch in _row_groups(path):
            for row in batch:
                store.append(row)
    except OSError as e:  # the spill file's disk, not the table (its read errors are M3Errors)
        store.close()
        raise M3Error(f"cannot spill the references of {path} to {spill_dir or 'memory'} "
                      f"({e.strerror or e}); free space there and run the command again") from None
    except BaseException:
        store.close()
        raise
    return Rows(store, range(len(store)))


def _row_groups(path: Path):
    """references.parquet's rows, a row group at a time (lists of dicts); a table that cannot be
    read or whose rows contradict themselves is one M3Error naming it damaged."""
    try:
        for batch in pq.ParquetFile(str(path)).iter_batches(ROW_GROUP_SIZE):
            rows = batch.to_pylist()
            for row in rows:
                if len(row["token_ids"]) != row["n_tokens"]:
                    raise ValueError(f"reference {row['ref_id']} has {len(row['token_ids'])} token ids "
                                     f"and n_tokens {row['n_tokens']}")
            yield rows
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None


def read_references(path: Path, columns: list[str] | None = None) -> pa.Table:
    check_metadata(path)
    try:
        return pq.read_table(str(path), columns=columns)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None
