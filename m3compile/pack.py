"""Pack memories into zstd frames and write them into safetensors shards (formats/kv-shard.md).

One reference's memory (keys and values (L, H, K, D), positions (L, H, K); paper §3.3) becomes
one payload: a 14-byte header, the positions, then the keys' and values' quantized parts
(quantize.py). Each payload is compressed to one independent zstd frame, and a shard holds the
frames of many references concatenated in a U8 tensor with CSR offsets and ref ids beside it
(STYLE §5.1), so one reference is read by slicing its byte range. Sharding is a pure plan
(`plan_shards`) that the streaming `ShardWriter` follows (STYLE rule 12; huggingface_hub
`split_state_dict_into_shards`). Letters: R references, L memory layers, H kv-heads, K kept
tokens, D head dim.

The shard file is written here rather than by `safetensors.numpy.save_file`: safetensors 0.8
writes `__metadata__` keys in hash order, different on every run (safetensors issue #584), and
determinism is part of the format. The bytes are plain safetensors; tests check them against
safetensors' own writer and reader.
"""

import json
import math
import operator
import os
import re
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from m3compile.errors import REPAIR_HINT, M3Error
from m3compile.quantize import QuantError, QuantKV, Scheme, get_scheme

FORMAT, FORMAT_VERSION, CODEC = "m3-kv", 1, "zstd"
# measured in formats/kv-shard.md: on quantized K/V level 19 saves 1-3% more at ~1/80 the speed
ZSTD_LEVEL = 3
LAYOUT = "header,positions[L,H,K],keys[L,H,K,D],values[L,H,K,D]"  # keys/values as quant's parts
_HEADER = struct.Struct("<4sHHHHH")  # magic, version, L, H, K, D
_MAGIC = b"M3KV"
_POS = np.dtype("<u2")  # kept token index inside the reference
_MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header
_SHARD_NAME = "memory-{:05d}.safetensors"
INDEX_NAME = "memory.safetensors.index.json"


_LAYOUTS: "weakref.WeakKeyDictionary[Scheme, dict]" = weakref.WeakKeyDictionary()  # a scheme's own, gone with it


def _layout(scheme: Scheme, L: int, H: int, K: int, D: int) -> tuple[tuple, int]:
    """(scheme.parts of one role's (L, H, K, D), the payload's size): the same for every frame of a
    shape, so worked out once a scheme (reading SciFact's 150,638 frames asked 301,276 times). Kept
    beside the scheme, weakly: a vq scheme's codebooks are not held after the scheme is dropped."""
    try:
        cache = _LAYOUTS.setdefault(scheme, {})
    except TypeError:  # a scheme that cannot be weakly referenced: worked out every time
        cache = {}
    shape = (L, H, K, D)
    if shape not in cache:
        parts = tuple(scheme.parts(shape))
        cache[shape] = parts, (_HEADER.size + _POS.itemsize * L * H * K
                               + 2 * sum(p.dtype.itemsize * math.prod(p.shape) for p in parts))
    return cache[shape]


def payload_nbytes(scheme: Scheme, L: int, H: int, K: int, D: int) -> int:
    """Exact decompressed payload size: header, positions, keys and values parts."""
    return _layout(scheme, L, H, K, D)[1]


def bits_per_element(scheme: Scheme, L: int, H: int, K: int, D: int) -> float:
    """Stored bits per key/value element, counting scales, mins, positions and the header."""
    return 8 * payload_nbytes(scheme, L, H, K, D) / (2 * L * H * K * D)


def _role(scheme: Scheme, role: str) -> dict:
    # schemes with per-role state (vq.VQScheme: codebooks for keys and for values) take the role
    return {"role": role} if getattr(scheme, "per_role", False) else {}


def pack_payload(keys: QuantKV, values: QuantKV, positions: np.ndarray, scheme: Scheme | None = None) -> bytes:
    """The uncompressed payload bytes (formats/kv-shard.md, "Payload"); `scheme` is needed for
    schemes `get_scheme` cannot rebuild from their name alone (vq, which carries codebooks)."""
    assert keys.shape == values.shape and keys.scheme == values.scheme, (keys.shape, values.shape)
    assert scheme is None or scheme.name == keys.scheme, (scheme.name, keys.scheme)
    assert len(keys.shape) == 4 and max(keys.shape) <= 0xFFFF, keys.shape
    L, H, K, D = keys.shape
    assert positions.shape == (L, H, K), (positions.shape, keys.shape)
    out = [_HEADER.pack(_MAGIC, FORMAT_VERSION, L, H, K, D), positions.astype(_POS).tobytes()]
    for q in (keys, values):
        specs = (scheme or get_scheme(q.scheme)).parts(q.shape)
        for spec, a in zip(specs, q.parts, strict=True):
            assert a.shape == spec.shape and a.dtype.kind == spec.dtype.kind, (spec, a.shape, a.dtype)
            out.append(np.ascontiguousarray(a, dtype=spec.dtype).tobytes())
    return b"".join(out)


def unpack_payload(raw: bytes, scheme: Scheme, where: str = "payload",
                   copy: bool = True) -> tuple[QuantKV, QuantKV, np.ndarray]:
    """Split payload bytes into quantized keys, values and positions (L, H, K) uint16; `copy`
    False: read-only views of `raw` (what a check of shapes needs), else arrays of their own."""
    if len(raw) < _HEADER.size:
        raise M3Error(f"{where}: payload is {len(raw)} bytes, shorter than its header; the shard is damaged")
    magic, version, L, H, K, D = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise M3Error(f"{where}: payload magic {magic!r} is not {_MAGIC!r}; the shard is damaged or not m3-kv")
    if version < 1:  # no m3compile writes 0: a damaged header, not an older format
        raise M3Error(f"{where}: payload format_version {version} is not one m3compile writes (1 is the first); "
                      "the shard is damaged")
    _check_version(version, where)
    specs, want = _layout(scheme, L, H, K, D)
    if len(raw) != want:
        raise M3Error(f"{where}: payload is {len(raw)} bytes but (L,H,K,D)=({L},{H},{K},{D}) in {scheme.name} "
                      f"needs {want}; the shard is damaged or its `quant` is wrong")
    off = _HEADER.size
    positions = np.frombuffer(raw, _POS, L * H * K, off).reshape(L, H, K)  # (L, H, K)
    off += positions.nbytes
    quants = []
    for _ in range(2):
        parts = []
        for spec in specs:
            n = math.prod(spec.shape)
            part = np.frombuffer(raw, spec.dtype, n, off).reshape(spec.shape)
            parts.append(part.copy() if copy else part)
            off += n * spec.dtype.itemsize
        quants.append(QuantKV(scheme.name, (L, H, K, D), tuple(parts)))
    return quants[0], quants[1], positions.copy() if copy else positions


def encode_payload(keys, values, positions, scheme: Scheme) -> tuple[bytes, QuantError]:
    """Quantize one reference's memory and compress it into one zstd frame.

    Args:
        keys, values: (L, H, K, D) float tensors or arrays; keys are post-RoPE.
        positions: (L, H, K) kept token indices inside the reference, ascending per head, < 65536.
        scheme: from `quantize.get_scheme`; its name must be the shard's `quant`.
    Returns:
        the frame, and the quantization error over keys and values together.
    Example:
        >>> frame, err = encode_payload(k, v, pos, get_scheme("int8"))
    """
    pos = _checked_positions(positions, ndim=3)  # (L, H, K)
    qk, ek = scheme.quantize(keys, **_role(scheme, "k"))
    qv, ev = scheme.quantize(values, **_role(scheme, "v"))
    return _compressor().compress(pack_payload(qk, qv, pos, scheme)), ek.merge(ev)


def _checked_positions(positions, ndim: int) -> np.ndarray:
    """Kept token positions as int64, refused when they do not fit the payload's uint16."""
    pos = np.asarray(positions, dtype=np.int64)  # (..., L, H, K)
    if pos.size and (pos.min() < 0 or pos.max() > np.iinfo(_POS).max):
        raise M3Error(f"token positions {pos.min()}..{pos.max()} do not fit in uint16; "
                      "references longer than 65536 tokens are not supported: lower the chunk size")
    assert pos.ndim == ndim and (np.diff(pos, axis=-1) > 0).all(), "positions must ascend per head"
    return pos


def _compressor() -> zstandard.ZstdCompressor:
    """One frame per payload: checksummed and carrying its size (formats/kv-shard.md)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=0)


def encode_payloads(keys, values, positions, scheme: Scheme) -> list[tuple[bytes, QuantError]]:
    """encode_payload of every reference of a batch of equal shapes, frame for frame.

    Args:
        keys, values: (B, L, H, K, D) float tensors or arrays.
        positions: (B, L, H, K).
        scheme: as for encode_payload.
    Returns:
        B (frame, error) pairs, each byte-identical to encode_payload's for that reference.

    Schemes that quantize every value group or vector on its own (int, none, vq with a plain PQ:
    `quantize_batch`) quantize the batch in one pass; a per-reference loop of small numpy calls
    cost more than the forward of a small model. Others (the other vq codecs: `batch_encode`
    False) encode one reference at a time.
    """
    B = len(keys)
    if not hasattr(scheme, "quantize_batch") or not getattr(scheme, "batch_encode", True) or B == 0:
        return [encode_payload(keys[b], values[b], positions[b], scheme) for b in range(B)]
    pos = _checked_positions(positions, ndim=4)  # (B, L, H, K)
    _, L, H, K, D = keys.shape
    assert max(L, H, K, D) <= 0xFFFF and pos.shape == (B, L, H, K), (keys.shape, pos.shape)
    qk, ek = scheme.quantize_batch(keys, **_role(scheme, "k"))
    qv, ev = scheme.quantize_batch(values, **_role(scheme, "v"))
    specs = scheme.parts((L, H, K, D))
    parts = []
    for q in (qk, qv):
        for spec, a in zip(specs, q.parts, strict=True):
            assert a.shape == (B, *spec.shape) and a.dtype.kind == spec.dtype.kind, (spec, a.shape, a.dtype)
            parts.append(np.ascontiguousarray(a, dtype=spec.dtype))
    head, pos = _HEADER.pack(_MAGIC, FORMAT_VERSION, L, H, K, D), pos.astype(_POS)
    cctx = _compressor()
    return [(cctx.compress(b"".join([head, pos[b].tobytes(), *(a[b].tobytes() for a in parts)])), ek[b].merge(ev[b]))
            for b in range(B)]


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor, made once: making one costs ~11 us, a frame's decompress ~1 us
    (a decompressor may not be shared between threads)."""
    d = getattr(_LOCAL, "decompressor", None)
    if d is None:
        d = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return d


def _inflate(data: bytes, max_bytes: int, where: str) -> bytes:
    """Decompress one frame, refusing before decompressing one that declares no size or too large a
    size (a damaged or hostile shard), and one whose content checksum fails."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise M3Error(f"{where}: not a zstd frame ({e}); the shard is damaged") from None
    if declared < 0 or declared > max_bytes:
        size = "no content size" if declared < 0 else f"content size {declared}"
        raise M3Error(f"{where}: zstd frame declares {size}, but a reference of this kb is at most "
                      f"{max_bytes} bytes; refusing to decompress a damaged or hostile shard")
    try:
        return _decompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise M3Error(f"{where}: zstd frame does not decompress ({e}); the shard is damaged") from None


def decode_payload(data: bytes, scheme: Scheme, max_bytes: int, where: str = "payload"):
    """Decompress and dequantize one frame into (keys, values, positions).

    Args:
        data: one zstd frame, as written by `encode_payload`.
        scheme: the shard's `quant` scheme.
        max_bytes: the largest payload a reference of this kb can have, `payload_nbytes` at
            the kb's top_k; a frame declaring more (or no size) is refused before decompressing.
        where: names the shard and reference in errors.
    Returns:
        keys and values (L, H, K, D) float32 tensors, positions (L, H, K) int64 tensor.
    """
    qk, qv, pos = open_frame(data, scheme, max_bytes, where)
    import torch  # here, not at the top: reading shard headers and indexes does not need it

    keys, values = scheme.dequantize(qk, **_role(scheme, "k")), scheme.dequantize(qv, **_role(scheme, "v"))
    return keys, values, torch.from_numpy(pos.astype(np.int64))


@dataclass(frozen=True)
class ShardPlan:
    groups: tuple[range, ...]  # payload indices of each shard, in input order
    sizes: tuple[int, ...]  # kv bytes of each shard


def _starts_new_shard(n_in_shard: int, shard_bytes: int, size: int, max_shard_bytes: int) -> bool:
    # greedy in order; a payload larger than the limit gets a shard of its own
    return n_in_shard > 0 and shard_bytes + size > max_shard_bytes


def plan_shards(sizes: list[int], max_shard_bytes: int) -> ShardPlan:
    """Group payloads, in order, into shards of at most max_shard_bytes kv bytes each."""
    if max_shard_bytes <= 0:
        raise M3Error(f"max shard size must be positive, got {max_shard_bytes}")
    starts, totals = [], []
    for i, s in enumerate(sizes):
        if not starts or _starts_new_shard(i - starts[-1], totals[-1], s, max_shard_bytes):
            starts.append(i)
            totals.append(0)
        totals[-1] += s
    ends = starts[1:] + [len(sizes)]
    return ShardPlan(tuple(range(a, b) for a, b in zip(starts, ends)), tuple(totals))


@dataclass(frozen=True)
class RefLocation:
    ref_id: int
    shard: str  # shard file name, relative to the kb directory
    byte_offset: int  # start of the frame inside the shard's kv tensor
    byte_length: int  # frame length


@dataclass(frozen=True)
class ShardInfo:
    file: str  # shard file name
    tensors: tuple[str, ...]  # tensor names in the file
    nbytes: int  # data bytes (all tensors), as in the index's total_size
    n_refs: int


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], Iterable[bytes]]], metadata: dict,
                       sizes: dict[str, int] | None = None) -> int:
    # tensors: (name, dtype, shape, chunks) in data order; the header's keys are sorted. `sizes`
    # gives the byte size of a tensor whose chunks are a stream (read once, while writing)
    sizes = sizes or {}
    chunks_of = {name: chunks if name in sizes else list(chunks) for name, _, _, chunks in tensors}
    header, off = {"__metadata__": metadata}, 0
    for name, dtype, shape, _ in tensors:
        n = sizes[name] if name in sizes else sum(len(c) for c in chunks_of[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, *_ in tensors:
            n = 0
            for c in chunks_of[name]:
                f.write(c)
                n += len(c)
            start, end = header[name]["data_offsets"]
            if n != end - start:
                raise M3Error(f"{path}: tensor {name} streamed {n} bytes, not the {end - start} its header names")
    return off


class ShardWriter:
    """Streams frames into memory-NNNNN.safetensors files, one shard at a time.

    The open shard's frame bytes go to a temporary file beside it (`.memory-NNNNN.safetensors.kv.tmp`),
    and its per-frame index (id, size, errors, key: INDEX_RECORD, 56 bytes a frame) to another
    (`...idx.tmp`), not to memory: a 256 MB shard of small frames has ~175k of them, so a compile's
    memory does not grow with --max-shard-bytes or with the corpus (issue 16). Closing the shard
    writes the safetensors file (header, then index tensors and frame bytes read back from the
    temporary files in blocks) and drops the temporary files.

    Example:
        >>> with ShardWriter(kb, {"quant": s.name, "model_id": m}, 1 << 30) as w:
        ...     loc = w.add(ref_id, frame)
        >>> write_shard_index(kb, w.shards, w.metadata)
    """

    COPY_BLOCK = 1 << 22  # bytes read back from the temporary file at a time
    INDEX_RECORD = np.dtype([("ref_id", "<i8"), ("size", "<i8"), ("errs", "<f4", (2,)), ("key", "V32")])
    INDEX_BLOCK = 1 << 16  # index records read back at a time

    def __init__(self, out_dir: Path, metadata: dict[str, str], max_shard_bytes: int, first_index: int = 1):
        own = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "codec": CODEC,
               "zstd_level": str(ZSTD_LEVEL), "layout": LAYOUT, "rope": "post"}
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()), metadata
        assert all(metadata.get(k, v) == v for k, v in own.items()), (metadata, own)
        assert "quant" in metadata, "the caller names the quant scheme"
        if not metadata["quant"].startswith("vq"):  # vq schemes are checked with their codebooks
            get_scheme(metadata["quant"])  # refuses an unknown scheme now, not after hours of compiling
        if max_shard_bytes <= 0:
            raise M3Error(f"max shard size must be positive, got {max_shard_bytes}")
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.metadata = {**metadata, **own}
        self.shards: list[ShardInfo] = []
        self._index = first_index
        self._kv = self._idx = None  # the open shard's frame bytes and index: temporary files, opened by the first add
        self._reset()
        self._last_id: int | None = None
        self.written: list[str] = []  # shard files this writer wrote
        self.kept: list[str] = []  # identical shard files that were already there
        self.before_replace = None  # called with a file name before a differing file of that name is replaced

    def _reset(self) -> None:
        self._n, self._bytes = 0, 0  # frames and frame bytes in the open shard

    def _kv_path(self) -> Path:
        return self.out_dir / f".{_SHARD_NAME.format(self._index)}.kv.tmp"

    def _drop_kv(self) -> None:
        for f in (self._kv, self._idx):
            if f is not None:
                f.close()
        self._kv = self._idx = None
        self._kv_path().unlink(missing_ok=True)
        self._kv_path().with_suffix(".idx.tmp").unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.abort()  # on error, the unwritten shard is dropped

    def add(self, ref_id: int, payload: bytes, key: bytes = b"\0" * 32, err: tuple[float, float] = (0.0, 0.0)) -> RefLocation:
        """Append one frame; `key` is the reference's 32-byte content key (sha256) and `err` its
        quantization error (relative, max abs), both stored beside it."""
        assert self._last_id is None or ref_id > self._last_id, ("ref ids must ascend", self._last_id, ref_id)
        assert len(key) == 32, len(key)
        if _starts_new_shard(self._n, self._bytes, len(payload), self.max_shard_bytes):
            self.flush()
        if self._kv is None:
            self._kv = open(self._kv_path(), "w+b")
            self._idx = open(self._kv_path().with_suffix(".idx.tmp"), "w+b")
        loc = RefLocation(ref_id, _SHARD_NAME.format(self._index), self._bytes, len(payload))
        self._kv.write(payload)
        self._idx.write(struct.pack("<qq2f32s", ref_id, len(payload), *err, key))  # INDEX_RECORD; errs float32, as stored
        self._n += 1
        self._bytes += len(payload)
        self._last_id = ref_id
        return loc

    def _kv_blocks(self) -> Iterator[bytes]:
        self._kv.flush()
        self._kv.seek(0)
        while block := self._kv.read(self.COPY_BLOCK):
            yield block

    def _index_blocks(self, field: str) -> Iterator[np.ndarray]:
        """One field of the open shard's index records, INDEX_BLOCK frames at a time."""
        self._idx.flush()
        size = self.INDEX_RECORD.itemsize
        for lo in range(0, self._n, self.INDEX_BLOCK):
            hi = min(lo + self.INDEX_BLOCK, self._n)
            yield np.frombuffer(os.pread(self._idx.fileno(), (hi - lo) * size, lo * size), self.INDEX_RECORD)[field]

    def _offsets(self) -> Iterator[bytes]:
        """kv_offsets (n + 1,): 0, then the running sum of the frame sizes."""
        yield np.zeros(1, "<i8").tobytes()
        total = 0
        for sizes in self._index_blocks("size"):
            ends = total + np.cumsum(sizes, dtype=np.int64)
            total = int(ends[-1])
            yield ends.astype("<i8").tobytes()

    def flush(self) -> None:
        if not self._n:
            return
        name, p = _SHARD_NAME.format(self._index), f"shard.{self._index:05d}"
        final, tmp = self.out_dir / name, self.out_dir / f".{name}.tmp"
        n = self._n
        fields = (b.tobytes() for b in self._index_blocks("ref_id")), (b.tobytes() for b in self._index_blocks("errs"))
        tensors = [(f"{p}.kv_offsets", "I64", [n + 1], self._offsets()),
                   (f"{p}.ref_ids", "I64", [n], fields[0]),
                   (f"{p}.ref_errs", "F32", [n, 2], fields[1]),
                   (f"{p}.kv", "U8", [self._bytes], self._kv_blocks()),
                   (f"{p}.ref_keys", "U8", [n, 32], (b.tobytes() for b in self._index_blocks("key")))]
        # (safetensors' own order: by dtype, then name) each streamed from the temporary files
        sizes = {f"{p}.kv_offsets": 8 * (n + 1), f"{p}.ref_ids": 8 * n, f"{p}.ref_errs": 8 * n,
                 f"{p}.kv": self._bytes, f"{p}.ref_keys": 32 * n}
        try:
            nbytes = _write_safetensors(tmp, tensors, self.metadata, sizes=sizes)
            if final.exists() and _same_bytes(tmp, final):
                # a resumed compile rebuilds the shard an interrupted one already wrote: keep that
                # file as it is (same bytes, same mtime)
                self.kept.append(name)
            else:
                # never an existing shard of a committed kb: the caller numbers new shards after those
                if final.exists() and self.before_replace is not None:
                    self.before_replace(name)
                _fsync_replace(tmp, final)
                self.written.append(name)
        finally:
            tmp.unlink(missing_ok=True)
            self._drop_kv()
        self.shards.append(ShardInfo(name, tuple(sorted(t[0] for t in tensors)), nbytes, n))
        self._index += 1
        self._reset()

    def close(self) -> None:
        self.flush()

    def abort(self) -> None:
        """Drop the open shard unwritten (its frames are not kept anywhere by this writer)."""
        self._drop_kv()
        self._reset()


def write_shard_index(out_dir: Path, shards: list[ShardInfo], metadata: dict[str, str]) -> Path:
    """Write memory.safetensors.index.json (HF keys, written even for one shard), atomically."""
    meta = {**metadata, "total_size": sum(s.nbytes for s in shards), "n_shards": len(shards),
            "n_refs": sum(s.n_refs for s in shards), "index_always_written": "true"}
    index = {"metadata": meta, "weight_map": {t: s.file for s in shards for t in s.tensors}}
    final = Path(out_dir) / INDEX_NAME
    tmp = final.with_name(f".{INDEX_NAME}.tmp")
    try:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _check_version(version, where: str) -> None:
    if version > FORMAT_VERSION:
        raise M3Error(f"{where}: kb shard format_version {version} is newer than this m3compile reads "
                      f"({FORMAT_VERSION}); upgrade m3compile")


def check_shard_metadata(meta: dict, where: str) -> None:
    """Refuse a shard this version cannot read; unknown extra keys are ignored."""
    if meta.get("format") != FORMAT:
        raise M3Error(f"{where}: __metadata__ format is {meta.get('format')!r}, not {FORMAT!r}; not an m3 kb shard")
    v = str(meta.get("format_version", ""))
    if not re.fullmatch(r"[1-9][0-9]*", v):
        raise M3Error(f"{where}: format_version {v!r} is not a positive integer; the shard is damaged")
    _check_version(int(v), where)
    for key, want in (("codec", CODEC), ("layout", LAYOUT)):
        if meta.get(key) != want:
            raise M3Error(f"{where}: {key} {meta.get(key)!r} is not {want!r}, the only one format_version "
                          f"{FORMAT_VERSION} defines; the shard is damaged")


def read_shard_header(path: Path, whole: bool = True) -> dict:
    """Read only the 8-byte length and JSON header of a shard; check that it is whole and ours.

    whole=False accepts a file shorter than its header says (a truncated shard), for a repair that
    salvages the frames still in it: each frame is checked on its own (pack.check_frame)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise M3Error(f"{path.name}: header length {n} is impossible for a {size}-byte file; "
                              "the shard is truncated or not safetensors")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise M3Error(f"cannot read shard {path}: {type(e).__name__ if isinstance(e, RecursionError) else e}; the file "
                      f"is damaged: {REPAIR_HINT.format(kb=path.parent)}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise M3Error(f"{path.name}: safetensors header has no __metadata__; not an m3 kb shard")
    try:
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError, OverflowError):  # OverflowError: 1e999
        raise M3Error(f"{path.name}: a tensor entry lacks valid data_offsets; the shard is damaged") from None
    if max(ends, default=0) != size - 8 - n and (whole or max(ends, default=0) < size - 8 - n):
        raise M3Error(f"{path.name}: tensors need {max(ends, default=0)} data bytes but the file has "
                      f"{size - 8 - n}; the shard is truncated or damaged: {REPAIR_HINT.format(kb=path.parent)}")
    check_shard_metadata(header["__metadata__"], path.name)
    return header


def shard_info(path: Path) -> ShardInfo:
    """ShardInfo of an existing shard, from its header (to re-index after appending shards)."""
    header = read_shard_header(path)
    tensors = tuple(sorted(k for k in header if k != "__metadata__"))
    ids = [k for k in tensors if k.endswith(".ref_ids")]
    nbytes = max(header[k]["data_offsets"][1] for k in tensors)
    return ShardInfo(Path(path).name, tensors, nbytes, sum(header[k]["shape"][0] for k in ids))


class ShardReader:
    """One shard's frames read by byte range, its header read and checked once: code that reads
    many frames (verify, compact, an incremental compile copying frames, repair) opens one reader
    per shard; `read_payload` opens one per call. Use as a context manager, or close().

    `ahead` > 0: a read takes that many bytes from the frame on (at most to the kv end) and later
    frames inside them come from that buffer: one read per `ahead` bytes for a scan in offset order
    (`m3 verify` reads every frame; a read a frame was a quarter of its time). Only for a shard that
    does not change while the reader is open: the default (0) reads each frame from the file."""

    def __init__(self, shard_path: Path, salvage: bool = False, ahead: int = 0):
        self.path = Path(shard_path)
        self.ahead = ahead
        self._buf, self._buf_at = b"", 0  # bytes read ahead, and their kv offset
        header = read_shard_header(self.path, whole=not salvage)  # salvage: a truncated shard's first frames
        kv = [k for k in header if k.endswith(".kv")]
        if len(kv) != 1:
            raise M3Error(f"{self.path.name}: shard has {len(kv)} kv tensors, expected 1; the shard is damaged")
        t = header[kv[0]]
        try:  # what safetensors checks before a slice: a U8 vector whose bytes its offsets span
            a, b = int(t["data_offsets"][0]), int(t["data_offsets"][1])
            ok = t["dtype"] == "U8" and len(t["shape"]) == 1 and int(t["shape"][0]) == b - a
        except (KeyError, TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            raise M3Error(f"{self.path.name}: its kv tensor is not a U8 vector of its data_offsets' size; "
                          f"the shard is damaged: {REPAIR_HINT.format(kb=self.path.parent)}")
        self.kv_bytes = b - a
        self._file = None
        try:
            self._file = open(self.path, "rb", buffering=0)  # a frame is one read; no stale buffer
            n = struct.unpack("<Q", self._file.read(8))[0]  # read_shard_header checked it
        except (OSError, struct.error) as e:
            self.close()
            raise M3Error(f"cannot read shard {self.path}: {e}; the file is damaged: {REPAIR_HINT.format(kb=self.path.parent)}") from None
        self._base = 8 + n + a  # file offset of kv byte 0

    def read(self, offset: int, length: int, ref_id: int = -1) -> bytes:
        """Bytes [offset, offset+length) of the kv tensor: one frame, no other byte."""
        a, b = offset, offset + length
        if not 0 <= a < b <= self.kv_bytes:
            raise M3Error(f"{self.path.name} ref {ref_id}: byte range [{a}, {b}) is outside the shard's "
                          f"{self.kv_bytes} kv bytes; references.parquet does not match this shard")
        data = None
        if self.ahead:
            if self._buf_at <= a and b <= self._buf_at + len(self._buf):
                return self._buf[a - self._buf_at:b - self._buf_at]
            self._buf = b""
            try:
                self._buf, self._buf_at = self._read_at(a, max(length, min(self.ahead, self.kv_bytes - a))), a
                data = self._buf[:length]
            except M3Error:  # an unreadable spot ahead must fault its own frame only: this one read alone
                pass
        if data is None:
            data = self._read_at(a, length)
        if len(data) != length:
            raise M3Error(f"{self.path.name} ref {ref_id}: the shard ends inside this frame; it is truncated")
        return data

    def _read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the kv tensor from `offset` (fewer where the file ends)."""
        try:
            self._file.seek(self._base + offset)
            return self._file.read(length)
        except OSError as e:
            raise M3Error(f"cannot read shard {self.path}: {e}; the file is damaged: {REPAIR_HINT.format(kb=self.path.parent)}") from None

    def drop_buffer(self) -> None:
        """Free the bytes read ahead (a reader left open while others are read)."""
        self._buf, self._buf_at = b"", 0

    def close(self) -> None:
        self.drop_buffer()
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardReaders:
    """ShardReaders kept open by path, for reading frames from shards in any order; with a `root`,
    shards are named relative to it (a kb directory). At most `max_open` stay open (the least
    recently used is closed): a kb of thousands of shards must not run out of file handles.
    `ahead`: each reader's read-ahead (ShardReader); only the reader read last holds its bytes, so
    at most `ahead` bytes are held however many shards are open."""

    def __init__(self, root: Path | None = None, max_open: int = 64, salvage: bool = False, ahead: int = 0):
        self.root, self.max_open, self.salvage, self.ahead = root, max_open, salvage, ahead
        self._open: OrderedDict[Path | str, ShardReader] = OrderedDict()
        self._last: ShardReader | None = None  # the reader read last

    def read(self, shard_path: Path | str, offset: int, length: int, ref_id: int = -1) -> bytes:
        """A frame of the shard at `shard_path`; the same path (a str or Path) reuses its reader."""
        r = self._open.get(shard_path)
        if r is None:
            r = ShardReader(Path(shard_path) if self.root is None else self.root / shard_path, self.salvage, self.ahead)
            self._open[shard_path] = r
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard_path)
        if self.ahead and self._last is not None and self._last is not r:
            self._last.drop_buffer()
        self._last = r
        return r.read(offset, length, ref_id)

    def forget(self, shard_path: Path | str) -> None:
        """Close the reader of a shard about to be moved or replaced."""
        r = self._open.pop(shard_path, None)
        if r is not None:
            r.close()

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        self._last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_payload(shard_path: Path, loc: RefLocation) -> bytes:
    """One reference's frame, read by slicing its byte range; no other frame is read."""
    with ShardReader(shard_path) as r:
        return r.read(loc.byte_offset, loc.byte_length, loc.ref_id)


def check_frame(frame: bytes, scheme: Scheme, max_bytes: int, where: str = "frame") -> tuple[int, int, int, int]:
    """(L, H, K, D) of a frame that decompresses whole (zstd content checksum included) into a
    payload of `scheme`, at most max_bytes; M3Error naming `where` otherwise. A frame is reused or
    copied only after this check (formats/kv-shard.md, "Frame and payload")."""
    return open_frame(frame, scheme, max_bytes, where)[0].shape


def ascending_below(pos: np.ndarray, n: int) -> bool:
    """Whether each (layer, head)'s kept positions (.., K) ascend strictly and stay below n: over
    the flat list, with numpy only for long ones (a frame's few dozen cost more in numpy calls)."""
    if pos.size > 256:
        return int(pos.max()) < n and not (np.diff(pos.astype(np.int64), axis=-1) <= 0).any()
    k = pos.shape[-1]
    flat = pos.ravel().tolist()
    return max(flat) < n and all(all(map(operator.lt, flat[r:r + k - 1], flat[r + 1:r + k]))
                                 for r in range(0, len(flat), k))


def open_frame(frame: bytes, scheme: Scheme, max_bytes: int, where: str = "frame",
               copy: bool = True) -> tuple[QuantKV, QuantKV, np.ndarray]:
    """A frame decompressed whole (zstd content checksum included) and split into its quantized
    keys, values and positions (L, H, K) uint16, not dequantized; M3Error naming `where` otherwise.
    `copy` as for unpack_payload."""
    return unpack_payload(_inflate(frame, max_bytes, where), scheme, where, copy)

