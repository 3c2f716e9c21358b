"""references.parquet: one row per reference (formats/references.md, STYLE §5.3).

An explicit schema, zstd compression, fixed row groups, and one schema-metadata key `m3compile`
holding {format, format_version}. Rows are written incrementally, so memory stays one row group.
"""

import json
import os
import tempfile
from array import array
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3compile.errors import M3Error

FORMAT, FORMAT_VERSION = "m3-references", 1
FILE_NAME = "references.parquet"
ROW_GROUP_SIZE = 4096  # rows per row group (fixed, so the bytes do not depend on the batch size)
# Columns written with dictionary pages: a document's values, repeated on each of its rows, which
# document_keys and KB._locations read as dictionaries straight from the pages. The other columns
# are unique per row (ref_key, text, token ids, offsets), where a dictionary only adds bytes: without
# theirs the file is 9 % smaller (the demo world's kb, 7,178 rows: 815 -> 741 KB, 0.39 bytes per
# corpus token).
DICTIONARY_COLUMNS = ("doc_id", "source", "doc_sha256", "shard")

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


_NUMPY_OF = {pa.int64(): "<i8", pa.int32(): "<i4", pa.int16(): "<i2", pa.int8(): "<i1", pa.float32(): "<f4"}


def _column(values: list, kind: pa.DataType) -> pa.Array:
    """One column of SCHEMA from Python values, built from buffers: pa.array() of Python (or numpy)
    values makes pyarrow import pandas where it is installed, 0.3-0.4 s of every compile."""
    n = len(values)
    if kind in _NUMPY_OF:
        return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(np.asarray(values, _NUMPY_OF[kind]))])
    if kind == pa.string():
        data = [v.encode("utf-8") for v in values]
        offsets = np.zeros(n + 1, "<i4")
        np.cumsum([len(d) for d in data], out=offsets[1:])
        return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
    assert kind == pa.list_(pa.int32()), kind  # token_ids
    offsets = np.zeros(n + 1, "<i4")
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate([np.empty(0, "<i4"), *(np.asarray(v, "<i4") for v in values)])
    child = pa.Array.from_buffers(pa.int32(), len(flat), [None, pa.py_buffer(flat)])
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets)], children=[child])


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The rows (dicts with SCHEMA's columns) as a table of `schema`; what Table.from_pylist gives."""
    table = pa.Table.from_arrays([_column([r[f.name] for r in rows], f.type) for f in schema], schema=schema)
    table.validate(full=True)
    return table


class ReferenceWriter:
    """Appends rows (dicts with SCHEMA's columns) to references.parquet; `close()` finishes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: list[dict] = []
        self._writer = pq.ParquetWriter(str(self.path), _schema_with_metadata(), compression="zstd",
                                        use_dictionary=list(DICTIONARY_COLUMNS))
        self.n_rows = 0

    def add_table(self, table: pa.Table) -> None:
        """Append ROW_GROUP_SIZE rows at once (RefColumns.table), where no rows wait to be added:
        the row groups are those `add` of each row makes."""
        assert not self._rows and table.num_rows <= ROW_GROUP_SIZE, (len(self._rows), table.num_rows)
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        self.n_rows += table.num_rows

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) == ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(_table(self._rows, self._writer.schema), row_group_size=ROW_GROUP_SIZE)
            self.n_rows += len(self._rows)
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


class _Bytes:
    """A growable byte store read and written at offsets: an anonymous temporary file in `spill_dir`
    (gone when closed or when the process dies; read with pread, never mapped, so what it holds is
    not resident memory), or a bytearray when `spill_dir` is None."""

    def __init__(self, spill_dir: Path | None):
        self._buf = bytearray() if spill_dir is None else None
        self._file = None if spill_dir is None else tempfile.TemporaryFile(dir=spill_dir, prefix=".plan-",
                                                                           suffix=".tmp")
        self._dirty = False  # the file's write buffer holds appended bytes not yet readable by pread
        self.size = 0

    def append(self, data: bytes) -> int:
        """Add `data` at the end; its offset."""
        at = self.size
        if self._file is None:
            self._buf += data
        else:
            self._file.write(data)  # buffered: the file's position is always its end (writes use pwrite)
            self._dirty = True
        self.size += len(data)
        return at

    def write(self, at: int, data: bytes) -> None:
        """Put `data` at offset `at` (past the end: the gap is zeros). A store is either appended
        to or written at offsets, never both (the file's buffered position is its end)."""
        if self._file is None:
            if at > len(self._buf):
                self._buf += bytes(at - len(self._buf))
            self._buf[at:at + len(data)] = data
        else:
            done = 0
            while done < len(data):
                done += os.pwrite(self._file.fileno(), data[done:], at + done)
        self.size = max(self.size, at + len(data))

    def _flush(self) -> None:
        if self._dirty:
            self._file.flush()
            self._dirty = False

    def read(self, lo: int, hi: int) -> bytes:
        if self._file is None:
            return bytes(self._buf[lo:hi])
        self._flush()
        parts, at = [], lo
        while at < hi:  # pread may return less than asked (past 2 GiB on Linux, or a signal)
            got = os.pread(self._file.fileno(), hi - at, at)
            if not got:
                raise OSError(f"the plan's spill file ends at byte {at}, before {hi}")
            parts.append(got)
            at += len(got)
        return b"".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RefColumns:
    """Reference rows (SCHEMA's columns) for a compile's plan, in bounded memory whatever the
    number of rows (issue 16: a dict a row took ~1 KB, numbers held as columns ~125 bytes). Rows
    are appended once, read back as dicts (`row`, `rows`) or as columns (`column`), and their
    frame fields set once encoded (`locate`).

    Each row is a fixed-size record (RECORD: its numbers, its content key as 32 raw bytes, codes
    of the strings a document or a shard shares, which are stored once) plus a variable record
    (its token ids as int32, then its text as UTF-8). Given `spill_dir`, both go to anonymous
    temporary files there; only CACHE_BLOCKS blocks of BLOCK_ROWS fixed records are held (the
    block being appended to, the ones being read or located), written back when they leave.
    Without `spill_dir` both are bytearrays (small plans, tests)."""

    INTERNED = DICTIONARY_COLUMNS  # the strings a document or a shard shares
    INTS = {"ref_id": "<i8", "index": "<i4", "char_start": "<i8", "char_end": "<i8", "n_tokens": "<i4",
            "n_kept": "<i4", "byte_offset": "<i8", "byte_length": "<i8"}
    FLOATS = ("quant_rel_err", "quant_max_err")  # float64: the encoder's values, rounded to float32 on write
    LOCATION = ("n_kept", "shard", "byte_offset", "byte_length", "quant_rel_err", "quant_max_err")
    RECORD = np.dtype([*INTS.items(), *((k, "<f8") for k in FLOATS), *((k, "<i4") for k in INTERNED),
                       ("start", "<i8"), ("text_bytes", "<i4"), ("key", "V32")])
    BLOCK_ROWS = 4096  # fixed records per block (~0.5 MB)
    CACHE_BLOCKS = 8
    READ_BYTES = 1 << 24  # the most one read of consecutive variable records takes

    def __init__(self, spill_dir: Path | None = None):
        self._fixed, self._var = _Bytes(spill_dir), _Bytes(spill_dir)
        self._n = 0
        self._blocks: OrderedDict[int, list] = OrderedDict()  # block -> [records (BLOCK_ROWS,), dirty]
        self._strings: dict[str, list[str]] = {k: [] for k in self.INTERNED}
        self._lookup: dict[str, dict[str, int]] = {k: {} for k in self.INTERNED}
        self.ascending = True  # the rows' ref ids ascend in row order (a new kb's plan): no sort needed
        self._last_id: int | None = None

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        """Drop the spilled records (the files are anonymous: a killed process leaves nothing)."""
        self._fixed.close()
        self._var.close()

    def _code(self, name: str, value: str) -> int:
        table = self._lookup[name]
        code = table.get(value)
        if code is None:
            code = table[value] = len(self._strings[name])
            self._strings[name].append(value)
        return code

    def _block(self, b: int, dirty: bool = False) -> np.ndarray:
        """Block b's fixed records, held until CACHE_BLOCKS newer ones push it out (written back
        if changed); `dirty`: the caller changes them."""
        got = self._blocks.get(b)
        if got is None:
            size = self.RECORD.itemsize
            got = [np.zeros(self.BLOCK_ROWS, self.RECORD), False]
            lo, hi = b * self.BLOCK_ROWS * size, min(self._fixed.size, (b + 1) * self.BLOCK_ROWS * size)
            if hi > lo:
                got[0][:(hi - lo) // size] = np.frombuffer(self._fixed.read(lo, hi), self.RECORD)
            self._blocks[b] = got
            while len(self._blocks) > self.CACHE_BLOCKS:
                old, (records, changed) = self._blocks.popitem(last=False)
                if changed:
                    rows = min(self.BLOCK_ROWS, self._n - old * self.BLOCK_ROWS)
                    self._fixed.write(old * self.BLOCK_ROWS * size, records[:rows].tobytes())
        else:
            self._blocks.move_to_end(b)
        got[1] = got[1] or dirty
        return got[0]

    def _record(self, i: int) -> np.void:
        """Row i's fixed record: from its block if held, else read alone."""
        b, k = divmod(i, self.BLOCK_ROWS)
        got = self._blocks.get(b)
        if got is not None:
            return got[0][k]
        size = self.RECORD.itemsize
        return np.frombuffer(self._fixed.read(i * size, (i + 1) * size), self.RECORD)[0]

    def _records_at(self, positions) -> np.ndarray:
        """The fixed records of rows at `positions`, in that order, read a block at a time."""
        pos = np.asarray(positions, dtype=np.int64)
        if not len(pos):
            return np.empty(0, self.RECORD)
        order = None if bool(np.all(pos[1:] >= pos[:-1])) else np.argsort(pos, kind="stable")
        sp = pos if order is None else pos[order]
        blocks = sp // self.BLOCK_ROWS
        cuts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
        got = np.empty(len(pos), self.RECORD)
        distinct = not bool(np.any(sp[1:] == sp[:-1]))  # sorted: a repeat sits beside its twin
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(sp)]):
            b = int(blocks[lo])
            first = int(sp[lo]) - b * self.BLOCK_ROWS
            if distinct and int(sp[hi - 1]) - int(sp[lo]) == hi - lo - 1:  # consecutive rows: a slice
                got[lo:hi] = self._block(b)[first:first + hi - lo]  # copies 3-4x faster than by index
            else:
                got[lo:hi] = self._block(b)[sp[lo:hi] - b * self.BLOCK_ROWS]
        if order is None:
            return got
        out = np.empty(len(pos), self.RECORD)
        out[order] = got
        return out

    def append(self, row: dict) -> int:
        """Add a row (SCHEMA's columns; frame fields may be missing until `locate`); its position."""
        key = bytes.fromhex(row["ref_key"])
        assert len(key) == 32, row["ref_key"]
        assert len(row["token_ids"]) == row["n_tokens"], (len(row["token_ids"]), row["n_tokens"])
        get = row.get
        text = row["text"].encode("utf-8")
        start = self._var.append(array("i", row["token_ids"]).tobytes() + text)
        i = self._n
        self._n += 1
        self._block(i // self.BLOCK_ROWS, dirty=True)[i % self.BLOCK_ROWS] = (
            *(get(k, 0) for k in self.INTS), *(get(k, 0.0) for k in self.FLOATS),
            *(self._code(k, get(k, "")) for k in self.INTERNED), start, len(text), key)
        ref_id = get("ref_id", 0)
        self.ascending = self.ascending and (self._last_id is None or ref_id > self._last_id)
        self._last_id = ref_id
        return i

    def codes(self, name: str, values) -> np.ndarray:
        """The codes of `values` (strings of an INTERNED column) in this store, interning new ones."""
        return np.fromiter((self._code(name, v) for v in values), np.int32, len(values))

    def extend(self, fixed: np.ndarray, variable: list[bytes]) -> range:
        """Append rows at once: their fixed records (RECORD; `start` is set here) and variable records
        (token ids, then text), in order; what `append` of each would store. Their positions."""
        assert fixed.dtype == self.RECORD and len(fixed) == len(variable), (fixed.dtype, len(variable))
        lengths = np.fromiter(map(len, variable), np.int64, len(variable))
        assert np.array_equal(lengths, 4 * fixed["n_tokens"].astype(np.int64) + fixed["text_bytes"])
        fixed = fixed.copy()
        fixed["start"] = self._var.append(b"".join(variable)) + np.cumsum(lengths) - lengths
        lo = self._n
        self._n += len(fixed)
        i = lo
        while i < self._n:  # a block at a time
            b, k = divmod(i, self.BLOCK_ROWS)
            n = min(self.BLOCK_ROWS - k, self._n - i)
            self._block(b, dirty=True)[k:k + n] = fixed[i - lo:i - lo + n]
            i += n
        if len(fixed):
            ids = fixed["ref_id"]
            self.ascending = self.ascending and (self._last_id is None or int(ids[0]) > self._last_id) \
                and bool(np.all(ids[1:] > ids[:-1]))
            self._last_id = int(ids[-1])
        return range(lo, self._n)

    def extend_from_table(self, batch: "pa.RecordBatch | pa.Table") -> range:
        """Append the rows of a references table (SCHEMA's columns, no nulls) at once; `append` of
        each row's dict stores the same. Their positions."""
        n = batch.num_rows
        fixed = np.zeros(n, self.RECORD)
        for name in (*self.INTS, *self.FLOATS):
            fixed[name] = _numbers(_whole(batch.column(name)))
        for name in self.INTERNED:  # a row group's few distinct strings interned, then their codes spread
            encoded = _whole(batch.column(name)).dictionary_encode()
            fixed[name] = self.codes(name, encoded.dictionary.to_pylist())[_numbers(encoded.indices)]
        keys = _whole(batch.column("ref_key")).to_pylist()
        if any(len(k) != 64 for k in keys):
            raise ValueError("a content key that is not 64 hex digits")
        fixed["key"] = np.frombuffer(bytes.fromhex("".join(keys)), "V32")
        ids, texts = _whole(batch.column("token_ids")), _whole(batch.column("text"))
        tok_off, txt_off = _offsets(ids).astype(np.int64), _offsets(texts).astype(np.int64)  # (n + 1,) each
        child = ids.values  # the whole child array: tok_off index it
        flat = np.frombuffer(child.buffers()[1], "<i4")[child.offset:].tobytes()
        data = texts.buffers()[2]
        data = b"" if data is None else data.to_pybytes()  # the whole array's UTF-8; offsets are into it
        fixed["text_bytes"] = np.diff(txt_off)
        t, c = (4 * tok_off).tolist(), txt_off.tolist()
        variable = [flat[t[i]:t[i + 1]] + data[c[i]:c[i + 1]] for i in range(n)]
        return self.extend(fixed, variable)

    FRAME = ("ref_id", "shard", "byte_offset", "byte_length", "quant_rel_err", "quant_max_err")  # a memory's

    def extend_from(self, src: "RefColumns", records: np.ndarray, variable: list[bytes], frames=None,
                    new_id: int = 0, **columns) -> range:
        """Append copies of `src`'s rows at once (their fixed and variable records: `records`,
        `variable`), their positions here. `frames`
        (src positions, -1 for none): each row takes that row's memory (FRAME: its ref id and
        frame), or none, a new row: ref ids from `new_id` on, no frame, as `append` leaves one.
        `columns` replace the rest: numbers as arrays or scalars, INTERNED strings as one string
        or as (strings, a count of rows for each), the rows in order."""
        fixed = records.copy()
        miss = None
        if frames is not None:
            frames = np.asarray(frames, np.int64)
            hit = frames >= 0
            miss = ~hit
            got = src._records_at(frames[hit])
            for name in self.FRAME:
                fixed[name][hit] = got[name]
                fixed[name][~hit] = 0
            fixed["ref_id"][~hit] = new_id + np.arange(int(np.sum(~hit)))
        for name in self.INTERNED:
            if name in columns:
                value = columns.pop(name)
                if isinstance(value, str):
                    fixed[name] = self._code(name, value)
                else:  # (strings, how many rows each)
                    fixed[name] = np.repeat(self.codes(name, value[0]), value[1])
            elif len(fixed):
                used, at = np.unique(fixed[name], return_inverse=True)
                fixed[name] = self.codes(name, [src._strings[name][c] for c in used.tolist()])[at]
        if miss is not None and miss.any():
            fixed["shard"][miss] = self._code("shard", "")
        for name, value in columns.items():
            fixed[name] = value
        return self.extend(fixed, variable)

    def records(self, positions) -> np.ndarray:
        """The fixed records (RECORD) of rows at `positions`, in that order."""
        return self._records_at(positions)

    def variable(self, records: np.ndarray) -> list[bytes]:
        """The variable records (token ids as int32, then text as UTF-8) of these fixed records' rows."""
        return self._variable(records)

    def _variable(self, records: np.ndarray) -> list[bytes]:
        """The variable records (token ids, then text) of these fixed records: ascending runs that
        are mostly theirs are read at once, at most READ_BYTES at a time; others one by one."""
        starts = records["start"].tolist()
        ends = (records["start"] + 4 * records["n_tokens"] + records["text_bytes"]).tolist()
        spans = list(zip(starts, ends))
        out, k = [], 0
        while k < len(spans):
            lo, j, used = spans[k][0], k + 1, spans[k][1] - spans[k][0]
            while j < len(spans) and spans[j - 1][1] <= spans[j][0] and spans[j][1] - lo <= self.READ_BYTES:
                used += spans[j][1] - spans[j][0]
                j += 1
            hi = spans[j - 1][1]
            if hi - lo <= 2 * used:
                block = self._var.read(lo, hi)
                out += [block[b - lo:e - lo] for b, e in spans[k:j]]
            else:
                out += [self._var.read(b, e) for b, e in spans[k:j]]
            k = j
        return out

    @staticmethod
    def _split(n_tokens: int, record: bytes) -> tuple[array, str]:
        """A variable record as (token ids, text)."""
        ids = array("i")
        ids.frombytes(record[:4 * n_tokens])
        return ids, record[4 * n_tokens:].decode("utf-8")

    def locate(self, i: int, **fields) -> None:
        """Set row i's frame fields (LOCATION: where its memory lies, and its quantization errors)."""
        records = self._block(i // self.BLOCK_ROWS, dirty=True)
        k = i % self.BLOCK_ROWS
        for name, v in fields.items():
            assert name in self.LOCATION, name
            records[name][k] = self._code(name, v) if name in self.INTERNED else v

    def keys(self, positions) -> np.ndarray:
        """The content keys of rows at `positions`, raw (32-byte void), in that order."""
        return self._records_at(positions)["key"]

    def _dicts(self, records: np.ndarray, variable: list[bytes]) -> list[dict]:
        """Rows as dicts of SCHEMA's columns, in its order, from their fixed and variable records
        (numbers taken a column at a time: a numpy scalar field read per row is slow)."""
        c = {k: records[k].tolist() for k in (*self.INTS, *self.FLOATS, *self.INTERNED)}
        s = self._strings
        doc_ids, sources, shas, shards = ([s[k][code] for code in c[k]] for k in self.INTERNED)
        keys = [k.hex() for k in records["key"].tolist()]
        out = []
        for j, record in enumerate(variable):
            ids, text = self._split(c["n_tokens"][j], record)
            out.append({"ref_id": c["ref_id"][j], "doc_id": doc_ids[j], "source": sources[j], "index": c["index"][j],
                        "char_start": c["char_start"][j], "char_end": c["char_end"][j],
                        "n_tokens": c["n_tokens"][j], "token_ids": ids, "text": text, "n_kept": c["n_kept"][j],
                        "shard": shards[j], "byte_offset": c["byte_offset"][j], "byte_length": c["byte_length"][j],
                        "quant_rel_err": c["quant_rel_err"][j], "quant_max_err": c["quant_max_err"][j],
                        "ref_key": keys[j], "doc_sha256": shas[j]})
        return out

    def row(self, i: int) -> dict:
        """Row i as a dict of SCHEMA's columns, in its order (token_ids an int32 array, as the plan
        holds them)."""
        r = self._record(i)[np.newaxis]
        return self._dicts(r, self._variable(r))[0]

    def rows(self, positions) -> list[dict]:
        """The rows at `positions`, their records read together."""
        records = self._records_at(positions)
        return self._dicts(records, self._variable(records))

    def column(self, name: str, positions) -> "list | np.ndarray":
        """One column's values at `positions`, without building the rows: a numpy array for the
        numbers (not a list of int objects: issue 16), else a list. Ask for a block of rows at a
        time (iter_columns): the result is held whole."""
        return self._column_of(self._records_at(positions), name)

    def columns(self, names, positions) -> dict[str, "list | np.ndarray"]:
        """{name: column(name, positions)}, the records read once for all of them."""
        records = self._records_at(positions)
        return {n: self._column_of(records, n) for n in names}

    def _column_of(self, records: np.ndarray, name: str) -> "list | np.ndarray":
        if name in self.INTS or name in self.FLOATS:
            return records[name].astype(self.INTS.get(name, "<f8")[1:])  # native order, a copy
        if name in self.INTERNED:
            strings = self._strings[name]
            return [strings[c] for c in records[name].tolist()]
        if name == "ref_key":
            return [k.tobytes().hex() for k in records["key"]]
        if name == "text":
            return [v[4 * n:].decode("utf-8") for n, v in zip(records["n_tokens"].tolist(), self._variable(records))]
        return [self._split(n, v)[0] for n, v in zip(records["n_tokens"].tolist(), self._variable(records))]

    def table(self, positions) -> pa.Table:
        """The rows at `positions` as a table of SCHEMA (with its metadata), built from the records'
        buffers: what `_table` of their dicts gives, without the dicts."""
        records = self._records_at(positions)
        n = len(records)
        data = np.frombuffer(b"".join(self._variable(records)), np.uint8)  # (bytes,) token ids, text, ...
        tok = 4 * records["n_tokens"].astype(np.int64)  # (n,) bytes of each row's token ids
        txt = records["text_bytes"].astype(np.int64)  # (n,)
        start = np.cumsum(tok + txt) - (tok + txt)  # (n,) each row's variable record in `data`

        def gather(lo, size):  # the byte ranges [lo, lo + size) of `data`, concatenated, and their offsets
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(size, out=offsets[1:])
            idx = np.repeat(lo - offsets[:-1], size) + np.arange(offsets[-1])
            return data[idx], offsets

        ids, id_off = gather(start, tok)
        text, text_off = gather(start + tok, txt)
        child = pa.Array.from_buffers(pa.int32(), len(ids) // 4, [None, pa.py_buffer(ids)])
        arrays = {
            "token_ids": pa.Array.from_buffers(pa.list_(pa.int32()), n,
                                               [None, pa.py_buffer((id_off // 4).astype("<i4"))], children=[child]),
            "text": pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(text_off.astype("<i4")),
                                                            pa.py_buffer(text)]),
            "ref_key": _column([k.hex() for k in records["key"].tolist()], pa.string()),
            **{k: _column([self._strings[k][c] for c in records[k].tolist()], pa.string()) for k in self.INTERNED}}
        schema = _schema_with_metadata()
        for f in schema:
            if f.name not in arrays:  # numbers: int64 / int32 / float32 as the schema says
                arrays[f.name] = pa.Array.from_buffers(
                    f.type, n, [None, pa.py_buffer(np.ascontiguousarray(records[f.name], _NUMPY_OF[f.type]))])
        table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
        table.validate(full=True)
        return table


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
        if len(self) != len(other):
            return False
        if not isinstance(other, Rows):
            return all(a == b for a, b in zip(self, other))
        # the records compared a block at a time, as the dicts would be: numbers, keys, strings
        # through each store's own interning, token ids and texts as bytes (a no-op compile of
        # SciFact compares 150,638 rows: 1.2 s as dicts)
        for lo in range(0, len(self), COLUMN_BLOCK):
            a = self.store._records_at(self.positions[lo:lo + COLUMN_BLOCK])
            b = other.store._records_at(other.positions[lo:lo + COLUMN_BLOCK])
            if any(not np.array_equal(a[k], b[k]) for k in (*RefColumns.INTS, *RefColumns.FLOATS, "text_bytes")) \
                    or a["key"].tobytes() != b["key"].tobytes():
                return False
            for k in RefColumns.INTERNED:
                sa, sb = self.store._strings[k], other.store._strings[k]
                if [sa[c] for c in a[k].tolist()] != [sb[c] for c in b[k].tolist()]:
                    return False
            if b"".join(self.store._variable(a)) != b"".join(other.store._variable(b)):
                return False
        return True

    def locate(self, j: int, **fields) -> None:
        self.store.locate(self.positions[j], **fields)

    def keys(self) -> np.ndarray:
        """Every row's content key, raw (32-byte void), in order (32 bytes a row: an incremental
        compile's index of its previous kb)."""
        return np.concatenate([np.empty(0, "V32"), *(self.store.keys(self.positions[lo:lo + COLUMN_BLOCK])
                                                     for lo in range(0, len(self), COLUMN_BLOCK))])


def positions_at(values, at):
    """values[at], for a range or an array of values and a range or an array of positions (a range
    of a range stays a range: no 8 bytes a row)."""
    if isinstance(at, range):
        return values[at.start:at.stop:at.step]
    if isinstance(values, range):
        return values.start + values.step * np.asarray(at, dtype=np.int64)
    return np.asarray(values)[np.asarray(at, dtype=np.int64)]  # values may be an array("q")


def columns(rows, names) -> dict[str, list]:
    """{name: values} over rows: a Rows view's columns read directly (numbers as numpy arrays), or
    a list of dicts' (lists). Held whole: over a big plan, use iter_columns."""
    if isinstance(rows, Rows):
        return rows.store.columns(names, rows.positions)
    return {n: [r[n] for r in rows] for n in names}


COLUMN_BLOCK = 1 << 16  # rows whose columns iter_columns reads at once


def iter_columns(rows, names, block: int | None = None):
    """columns() of consecutive blocks of `block` rows (default COLUMN_BLOCK), in order: what a pass
    over every row of a big plan holds at a time (issue 16)."""
    block = block or COLUMN_BLOCK
    for lo in range(0, len(rows), block):
        yield columns(rows[lo:lo + block], names)


def _numbers(column: pa.Array) -> np.ndarray:
    """A column of SCHEMA's number types (or a dictionary's signed indices) as a numpy view of its
    buffer (Array.to_numpy imports pandas where it is installed: 0.27 s)."""
    return np.frombuffer(column.buffers()[1], _NUMPY_OF[column.type])[column.offset:column.offset + len(column)]


def _offsets(column: pa.Array) -> np.ndarray:
    """A list or string column's n + 1 offsets (int32) into its whole child array or data buffer."""
    return np.frombuffer(column.buffers()[1], "<i4")[column.offset:column.offset + len(column) + 1]


def _layout(kind: pa.DataType):
    """What of a column's type its buffers depend on (a list's item type, not whether its items are
    declared nullable)."""
    return ("list", kind.value_type) if pa.types.is_list(kind) else kind


def _whole(column) -> pa.Array:
    """A table's column (chunked) or a batch's as one array without nulls (a damaged table's
    nulls are a ValueError, as `append` of a None would be)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} null values in a column that holds none")
    return column


def check_metadata(path: Path) -> pq.FileMetaData:
    """Read the footer only; refuse a foreign file or a newer format version."""
    try:
        meta = pq.read_metadata(str(path))
        raw = (meta.metadata or {}).get(b"m3compile")
        info = json.loads(raw) if raw else {}
    except (OSError, pa.ArrowException, ValueError, RecursionError) as e:  # ValueError: undecodable metadata
        raise M3Error(f"cannot read {path}: {type(e).__name__}: {e}; the file is damaged or missing") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise M3Error(f"{path} is not an m3compile references table (no m3compile metadata)")
    version = info.get("format_version")  # every m3compile, 0.1.0 on, wrote the integer 1
    if type(version) is not int or version < 1:
        raise M3Error(f"{path}: format_version {version!r} is not an integer of 1 or more (formats/references.md); "
                      "the file is damaged: run `m3 verify --repair` on its kb")
    if version > FORMAT_VERSION:
        raise M3Error(f"{path} has format_version {info['format_version']}, newer than this m3compile "
                      f"reads ({FORMAT_VERSION}); upgrade m3compile")
    return meta


def write_references(path: Path, rows: "Rows | list[dict]") -> None:
    with ReferenceWriter(path) as w:
        if isinstance(rows, Rows):  # a row group at a time, from the plan's records
            for lo in range(0, len(rows), ROW_GROUP_SIZE):
                w.add_table(rows.store.table(positions_at(rows.positions, range(lo, min(lo + ROW_GROUP_SIZE,
                                                                                          len(rows))))))
            return
        for row in rows:
            w.add(row)


def int64_column(column: "pa.ChunkedArray | pa.Array") -> np.ndarray:
    """An int64 column without nulls as a numpy array read from its buffers (.to_numpy() imports
    pandas where it is installed: 0.3 s of an `m3 query`)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return np.concatenate([np.empty(0, np.int64), *map(_numbers, chunks)])


class RowGroups:
    """references.parquet's row groups by the ref_id statistics of its footer (the table is written
    in ref id order, ROW_GROUP_SIZE rows a group): `read` of a few ref ids reads the groups that may
    hold them, not the table. The footer is read and checked once (a kb holds one)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = check_metadata(self.path)
        try:
            j = self.meta.schema.to_arrow_schema().get_field_index("ref_id")
            n = self.meta.num_row_groups
            self.lo, self.hi = np.full(n, np.iinfo(np.int64).min), np.full(n, np.iinfo(np.int64).max)  # (G,) each
            for g in range(n):  # a group without statistics keeps the whole range: it is always read
                st = self.meta.row_group(g).column(j).statistics if j >= 0 else None
                if st is not None and st.has_min_max:
                    self.lo[g], self.hi[g] = int(st.min), int(st.max)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise M3Error(f"cannot read {self.path}: {e}; the file is damaged") from None

    def read(self, ref_ids, columns: list[str] | None = None) -> pa.Table:
        """The groups that may hold these ids (other rows of them come too: the caller picks)."""
        return self.read_groups(self.groups_of(ref_ids), columns)

    def groups_of(self, ref_ids) -> list[int]:
        """The row groups that may hold these ids, ascending."""
        want = np.unique(np.asarray(ref_ids, np.int64))  # (Q,) ascending
        first = np.searchsorted(want, self.lo, side="left")  # (G,) the first id asked >= each group's least
        hit = (first < len(want)) & (want[np.minimum(first, max(len(want) - 1, 0))] <= self.hi) if len(want) \
            else np.zeros(len(self.lo), bool)
        return np.flatnonzero(hit).tolist()

    def read_groups(self, groups: list[int], columns: list[str] | None = None) -> pa.Table:
        try:
            with pq.ParquetFile(str(self.path), metadata=self.meta) as f:
                missing = [c for c in columns or () if c not in f.schema_arrow.names]
                if missing:
                    raise ValueError(f"no column {', '.join(missing)}")
                return checked_columns(f.read_row_groups(groups, columns=columns))
        except (OSError, pa.ArrowException, ValueError) as e:
            raise M3Error(f"cannot read {self.path}: {e}; the file is damaged") from None


class TokenGroups:
    """Token ids of references by ref id, read a row group at a time and kept as numpy arrays (ids,
    offsets, values: ~4 bytes a token, not a Python list a reference) for the groups used last, up
    to `budget` bytes of them. For the overlap filter, which looks at each query's candidates."""

    def __init__(self, path: Path, budget: int):
        self.groups, self.budget = RowGroups(path), budget
        self.kept: "OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
        self.bytes = 0

    def tokens(self, ref_ids) -> dict[int, list[int]]:
        """{ref id: its token ids} for every id asked that the table holds."""
        ids = list(dict.fromkeys(int(i) for i in ref_ids))
        need = self.groups.groups_of(ids)
        new = [g for g in need if g not in self.kept]
        if new:
            t = self.groups.read_groups(new, ["ref_id", "token_ids"])
            rid = int64_column(t.column("ref_id"))
            col = t.column("token_ids").combine_chunks()
            offsets, values = _offsets(col).astype(np.int64), _numbers(col.values)
            # the groups come back in order, each its rows: split them again by their row counts
            at = 0
            for g in new:
                n = self.groups.meta.row_group(g).num_rows
                o = offsets[at:at + n + 1]
                r = rid[at:at + n].copy()
                part = (r, np.argsort(r, kind="stable"), o - o[0], values[o[0]:o[-1]].copy())
                self.kept[g] = part
                self.bytes += part[3].nbytes + 24 * n
                at += n
        for g in need:
            self.kept.move_to_end(g)
        out = {}
        want = np.asarray(ids, np.int64)
        for g in need:
            rid, order, o, v = self.kept[g]
            if not len(rid):
                continue
            pos = order[np.minimum(np.searchsorted(rid, want, sorter=order), len(rid) - 1)]
            for j in np.flatnonzero(rid[pos] == want).tolist():  # only the ids this group holds
                p = int(pos[j])
                out[ids[j]] = v[o[p]:o[p + 1]].tolist()
        while self.bytes > self.budget and len(self.kept) > len(need):
            g, part = self.kept.popitem(last=False)
            self.bytes -= part[3].nbytes + 24 * len(part[0])
        return out

    def require(self, ref_ids, kb_dir) -> dict[int, list[int]]:
        """tokens(ref_ids), every id of which must be in the table: one that is not (an index out of
        step with it) is one M3Error naming the kb's repair."""
        found = self.tokens(ref_ids)
        absent = next((i for i in ref_ids if i not in found), None)
        if absent is not None:
            raise M3Error(f"reference {absent} of the kb's index is not in {self.groups.path}; the kb is damaged: "
                          f"run `m3 verify --repair {kb_dir}`")
        return found


def dictionary_indices(a: pa.Array) -> np.ndarray:
    """A dictionary column's indices (signed integers, no nulls) as int64, read from the buffer
    (KeyError for unsigned ones)."""
    return _numbers(a).astype(np.int64)


def document_keys(path: Path) -> dict[str, tuple[str, str]] | None:
    """{doc_id: (doc_sha256, source)} of the documents of references.parquet, its three columns
    read as dictionaries (~20 ms for SciFact's 150k rows, where their strings take 0.2 s); None
    where a document's rows disagree (two texts or files: it was cut from two) or the table cannot
    be read (whoever reads it whole says why)."""
    names = ["doc_id", "doc_sha256", "source"]
    out: dict[str, tuple[str, str]] = {}
    try:
        check_metadata(path)
        with pq.ParquetFile(str(path), read_dictionary=names) as f:
            if any(n not in f.schema_arrow.names for n in names):
                return None
            batches = f.iter_batches(columns=names, batch_size=1 << 16)
            for b in batches:
                cols = [b.column(i) for i in range(3)]
                if any(not pa.types.is_dictionary(c.type) or c.null_count for c in cols):
                    return None
                idx = [dictionary_indices(c.indices) for c in cols]  # (n,) each
                words = [c.dictionary.to_pylist() for c in cols]
                # a document's rows lie together in a kb's table, so one row a run of equal keys
                starts = np.flatnonzero(np.r_[True, (np.diff(idx[0]) != 0) | (np.diff(idx[1]) != 0)
                                              | (np.diff(idx[2]) != 0)]) if len(idx[0]) else np.zeros(0, np.int64)
                for j in starts.tolist():
                    key = (words[1][idx[1][j]], words[2][idx[2][j]])
                    if out.setdefault(words[0][idx[0][j]], key) != key:
                        return None
    except (M3Error, OSError, pa.ArrowException, ValueError, KeyError):  # KeyError: unsigned indices
        return None
    return out


def read_reference_rows(path: Path, spill_dir: Path | None = None) -> Rows:
    """references.parquet as plan rows (RefColumns: token ids and texts spilled to `spill_dir`),
    read a row group at a time: what an incremental compile holds of its kb (issue 16)."""
    check_metadata(path)
    store = RefColumns(spill_dir)
    try:
        for batch in _row_groups(path):
            try:
                store.extend_from_table(batch)
            except (pa.ArrowException, ValueError, KeyError, TypeError) as e:
                raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None
    except OSError as e:  # the spill file's disk, not the table (its read errors are M3Errors)
        store.close()
        raise M3Error(f"cannot spill the references of {path} to {spill_dir or 'memory'} "
                      f"({e.strerror or e}); free space there and run the command again") from None
    except BaseException:
        store.close()
        raise
    return Rows(store, range(len(store)))


def _row_groups(path: Path):
    """references.parquet's rows, a row group at a time (record batches, checked: columns without
    nulls, as many token ids as n_tokens says); a table that cannot be read or whose rows
    contradict themselves is one M3Error naming it damaged."""
    try:
        for batch in pq.ParquetFile(str(path)).iter_batches(ROW_GROUP_SIZE):
            if [(f.name, _layout(f.type)) for f in batch.schema] != [(f.name, _layout(f.type)) for f in SCHEMA]:
                raise ValueError("its columns are not those of formats/references.md")
            ids = _whole(batch.column("token_ids"))
            if ids.values.null_count:
                raise ValueError("a null token id")
            counts = np.diff(_offsets(ids))
            bad = np.flatnonzero(counts != _numbers(_whole(batch.column("n_tokens"))))
            if len(bad):
                j = int(bad[0])
                raise ValueError(f"reference {batch.column('ref_id')[j].as_py()} has {counts[j]} token ids "
                                 f"and n_tokens {batch.column('n_tokens')[j].as_py()}")
            yield batch
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None


def read_references(path: Path, columns: list[str] | None = None) -> pa.Table:
    check_metadata(path)
    try:
        # ParquetFile, not pq.read_table: the same table, without importing pyarrow.dataset (and
        # pandas, where installed), 0.25 s of every `m3 query`
        with pq.ParquetFile(str(path)) as f:
            missing = [c for c in columns or () if c not in f.schema_arrow.names]
            if missing:  # ParquetFile.read leaves an unknown column out where read_table refused it
                raise ValueError(f"no column {', '.join(missing)}")
            return checked_columns(f.read(columns=columns))
    except (OSError, pa.ArrowException, ValueError) as e:
        raise M3Error(f"cannot read {path}: {e}; the file is damaged") from None


_LAYOUTS = {f.name: _layout(f.type) for f in SCHEMA}


def checked_columns(table: pa.Table) -> pa.Table:
    """`table` if each of its columns has formats/references.md's type and no nulls, else a
    ValueError naming the column: read as they are, a null offset is whatever its buffer holds, and
    a null shard name the dictionary's first (another shard)."""
    for name, column in zip(table.column_names, table.columns):
        if name in _LAYOUTS and _layout(column.type) != _LAYOUTS[name]:
            raise ValueError(f"column {name} is {column.type}, not the {_LAYOUTS[name]} of formats/references.md")
        if column.null_count or (pa.types.is_list(column.type) and any(c.values.null_count for c in column.chunks)):
            raise ValueError(f"column {name} holds nulls")
    return table
