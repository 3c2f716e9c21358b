"""Vector quantizers for memory keys and values: FAISS codecs trained on a kb's own memories.

The paper stores each 80-dim key and value vector as 14 bytes with the FAISS quantizer
`OPQ20_80,Residual2x14,PQ8x10` (paper §3.3, App. B; ../shared/docs/memory3-paper.md §4.2).
Here any FAISS factory string that builds a standalone codec (`sa_encode`/`sa_decode`) works:
`train_codecs` trains one codec per group of vectors (by default per memory layer and role,
"k" or "v") on a bounded, seeded sample; `Codebooks` holds them and round-trips through a dict
of uint8 tensors (FAISS `serialize_index` bytes, no pickle) plus string metadata, the layout of
formats/vq-codebooks.md; `VQScheme` is the quantize.Scheme over them, storing one code array
(L, H, K, C) uint8 per role. Named presets resolve a factory for a head dim D (`resolve`).

Determinism: measured with faiss-cpu 1.15.1, plain PQ training (k-means per subspace: each point's
nearest centroid, then sums per centroid in point order) gives the same bytes on 1, 2 and 4
threads; OPQ does not (its rotation is fitted with multi-threaded BLAS), nor RQ on 4 threads. So a
plain PQ codec (every vq-pq* preset and the default) trains on FAISS's threads (half the time on 2
cores), every other codec on one FAISS thread (restored afterwards), and every clustering seed is
set from `seed`; trainings on the same sample give identical bytes whatever the caller's thread
count (tests/test_vq.py). Encoding is per vector and does not depend on threads.

Shape letters: N vectors, L memory layers (index into the spec's memory_layers), H kv heads,
K kept tokens, D head dim, C code bytes per vector.
"""

import hashlib
import json
import os
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faiss
import numpy as np

from m3compile.errors import M3Error
from m3compile.quantize import PartSpec, QuantError, QuantKV, _error, _errors

try:  # TableDecoder's lookups in C (m3compile/_lookup.c), built by setup.py where a compiler is
    from m3compile import _lookup
except ImportError:  # no compiler at install: numpy's take, the same floats, ~2x slower
    _lookup = None

if TYPE_CHECKING:
    import torch

# version 2: an `encoder` field ("grid": GridEncoder); codebooks without one are written as version 1,
# byte for byte as before, so their sha256 (in every frame's content key) stays the same
FORMAT, FORMAT_VERSION = "m3-vq-codebooks", 2
ROLES = ("k", "v")
GROUPS = ("layer", "head", "role", "all")  # one codec per (layer, role), (layer, head, role), role, or one
MAX_TRAIN = 65536  # vectors sampled per codec for training (the paper's 2x14 IMI wants 638,976)
_CODE = np.dtype("u1")


def _divisor_at_most(d: int, m: int) -> int:
    return max(k for k in range(1, max(1, m) + 1) if d % k == 0)


def paper_factory(d: int) -> str:
    """The paper's quantizer scaled to head dim D at its rate, 1.4 bits per element.

    Rule: keep the 2x14-bit multi-index first level (`Residual2x14`, 28 bits, 4 bytes) and the
    OPQ rotation's 4-dim blocks (OPQ M = D/4, or the largest divisor of D below it); the second
    level is PQ with 10-bit codes filling the rest of the 1.4·D-bit budget:
    M = floor((1.4·D - 28) / 10), at least 1, lowered to a divisor of D.
    D=80 gives exactly the paper's `OPQ20_80,Residual2x14,PQ8x10` (14 bytes); D=32 gives
    `OPQ8_32,Residual2x14,PQ1x10` (6 bytes, 1.5 bits per element: codes are byte-padded per
    level); below D=20 the first level alone exceeds the budget and M stays 1 (D=8: 6 bits/element).
    """
    m_opq = _divisor_at_most(d, d // 4)
    m_pq = _divisor_at_most(d, (14 * d // 10 - 28) // 10)
    return f"OPQ{m_opq}_{d},Residual2x14,PQ{m_pq}x10"


# preset name -> (factory for head dim D, codec group), measured by benchmarks/quant_frontier.py on the
# embedded reader (D = 32, kbs of 86 and 134 references; attention-output error with real queries):
#   vq           PQ{D/4}x4 per (layer, role): 1 code bit per element, 1.31 bits on disk with positions,
#                header and its 17 KB of codebooks; error 0.70; encodes 500x, decodes 1.6x vq-paper.
#                Per (layer, head, role) is 0.66 but doubles the codebooks (1.46 bits); per role 0.79.
#                The only candidate under 1.4 bits on these kbs: 8-bit codebooks are 16x larger.
#   vq-pq8       PQ{D/8}x8: error 0.48-0.56 and decodes 4x vq-paper, but 263 KB of codebooks per kb;
#                the better choice once a kb holds >= ~80k vectors per codec (codebooks <= 0.1 bit).
#   vq-rq8       RQ{D/8}x8: 0.43 on a held-out kb, below vq-paper's 0.46 at 1 code bit per element, but
#                1 MB of codebooks per kb (<= 0.1 bit once a kb holds ~10k references of this shape)
#                and it encodes only ~9x faster than vq-paper (beam search).
#   vq-lsq8      LSQ{D/8}x8 (additive, local search), the codebook size of vq-rq8: on the reader's
#                2000-article world kb (7178 references; benchmarks/quant_scale.py) 1.37 bits per
#                element on disk with its codebooks and error 0.370, against vq-paper's 1.89 bits and
#                0.389 and vq-rq8's 1.36 bits and 0.391. It compiles 4x slower than vq-paper (1019
#                against 258 s there): FAISS recomputes LSQ's codebook cross terms on every encode
#                call, and a call holds one reference. LSQ starts each encode call from seeded random codes,
#                so codes depend on what one call holds: every path encodes one reference per
#                (layer, role) call (VQScheme.quantize), which keeps a frame a function of its
#                reference alone.
#   vq-paper     error 0.11 on its own kb (its 2x2^14 centroids nearly memorise 27k vectors, 22 bits
#                per element with its 2.2 MB codebooks), 0.46 on a held-out kb; encodes 3.7k vectors/s.
PRESETS = {
    "vq-paper": (paper_factory, "all"),  # the paper pooled K and V of all layers (App. B)
    "vq-pq8-4bit": (lambda d: f"PQ{_divisor_at_most(d, d // 2)}x8", "layer"),  # 4 bits per element, 256-entry books
    "vq-pq4-4bit": (lambda d: f"PQ{d}x4", "layer"),  # 4 bits per element: 16 learned levels per dim
    "vq-pq4-2bit": (lambda d: f"PQ{_divisor_at_most(d, d // 2)}x4", "layer"),  # 2 bits per element
    "vq-pq4": (lambda d: f"PQ{_divisor_at_most(d, d // 4)}x4", "layer"),  # 1 bit per element
    "vq-pq4-half": (lambda d: f"PQ{_divisor_at_most(d, d // 8)}x4", "layer"),  # 0.5 bit per element
    "vq-pq8": (lambda d: f"PQ{_divisor_at_most(d, d // 8)}x8", "layer"),  # 1 bit per element, 256-entry books
    "vq-rq4": (lambda d: f"RQ{max(1, d // 4)}x4", "role"),  # 1 bit per element, residual with beam search
    "vq-rq8": (lambda d: f"RQ{max(1, d // 8)}x8", "layer"),  # 1 bit per element, residual with beam search
    # 1 bit per element, additive (local search): the lowest error at 1 bit (benchmarks/quant_scale.py)
    "vq-lsq8": (lambda d: f"LSQ{max(1, d // 8)}x8", "layer"),
}
# vq-grid: the codecs of vq-pq8-4bit, encoded by GridEncoder (a lookup per 2-dim subvector, 9-17x
# FAISS's exact search; a subvector near the border of two centroids' regions may get the other one)
PRESETS["vq-grid"] = (PRESETS["vq-pq8-4bit"][0], "layer")
ENCODERS = {"vq-grid": "grid"}  # preset -> encoder its codebooks record; the rest encode with FAISS
ENCODER_NAMES = ("faiss", "grid")
# the default: the embedded reader's held-out recall stays within 2 points of int8 only from ~4 code
# bits per element at D = 32 (benchmarks/reader_recall.py), and of the 4-bit candidates PQ with
# 2-dim subvectors and 256-entry books encodes fastest, fastest of all through the grid
# (formats/vq-codebooks.md has the figures). Kbs record the preset (vq-pq8-4bit before 0.2.0's grid).
PRESETS["vq"] = PRESETS["vq-grid"]


def default_preset() -> str:
    """The preset `vq` names now (a kb records the preset it resolved to, codebooks.resolve_quant)."""
    return next(k for k, v in PRESETS.items() if v is PRESETS["vq"] and k != "vq")


def resolve(name: str, d: int) -> tuple[str, str]:
    """(factory, group) for a preset name or `vq:<factory>` (group "layer") at head dim D.

    Example:
        >>> resolve("vq-paper", 80)
        ('OPQ20_80,Residual2x14,PQ8x10', 'all')
    """
    if name in PRESETS:
        fn, group = PRESETS[name]
        return fn(d), group
    if name.startswith("vq:") and len(name) > 3:
        return name[3:], "layer"
    raise M3Error(f"unknown vector quantizer {name!r}; use one of {', '.join(sorted(PRESETS))} or "
                  "vq:<faiss index factory>, e.g. vq:PQ8x4")


def codec_name(group: str, layer: int, head: int, role: str) -> str:
    """The tensor-name stem of the codec serving (layer, head, role) under `group`."""
    assert role in ROLES, role
    return {"layer": f"l{layer}.{role}", "head": f"l{layer}.h{head}.{role}", "role": role, "all": "kv"}[group]


@contextmanager
def _one_thread():
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(n)


def _training_threads(codec):
    """Where `codec` trains: a plain PQ of subvectors up to 16 dims on FAISS's threads (its k-means
    gives the same bytes on any count; tested up to 16 dims, beyond which FAISS assigns points
    through BLAS), anything else on one thread (OPQ and RQ do not)."""
    index = faiss.downcast_index(codec)
    return nullcontext() if type(index) is faiss.IndexPQ and index.pq.dsub <= 16 else _one_thread()


def _set_seeds(index, seed: int) -> None:
    # every k-means and random init inside the codec draws from `seed`, not FAISS's default 1234
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        _set_seeds(index.index, seed)
        return
    for part in ("pq", "rq", "lsq", "prq", "plsq", "q1"):
        obj = getattr(index, part, None)
        if obj is None:
            continue
        if hasattr(obj, "cp"):
            obj.cp.seed, obj.cp.verbose = seed, False
            # FAISS warns on stderr, once per k-means, when a codec has < 39 training vectors a
            # centroid (a small kb: 32 identical lines); the threshold gates that warning only,
            # and the compile says it once (pipeline._train_codebooks)
            obj.cp.min_points_per_centroid = 1
        if hasattr(obj, "random_seed"):
            obj.random_seed = seed
        for i in range(getattr(obj, "nsplits", 0)):  # product of residual/additive quantizers
            sub = faiss.downcast_AdditiveQuantizer(obj.subquantizer(i))
            if hasattr(sub, "cp"):
                sub.cp.seed, sub.cp.min_points_per_centroid = seed, 1
            if hasattr(sub, "random_seed"):
                sub.random_seed = seed


def build_codec(factory: str, d: int):
    """An untrained FAISS codec; M3Error if FAISS rejects the string for this D."""
    try:
        index = faiss.index_factory(d, factory)
    except RuntimeError as e:
        raise M3Error(f"FAISS cannot build a codec from {factory!r} for head dim {d}: "
                      f"{str(e).strip().splitlines()[-1][:200]}; check the factory string (e.g. PQ8x4, "
                      "OPQ8,PQ8x4, RQ8x4) and that its sizes divide D") from None
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    # a search index (HNSW32, IDMap,Flat, Flat,RFlat) builds, trains, and fails only when first asked
    # to encode; FAISS's standalone codecs are flat codes (PQ, RQ, LSQ, SQ, ...), IVF and Index2Layer
    codecs = tuple(getattr(faiss, n) for n in ("IndexFlatCodes", "IndexIVF", "Index2Layer", "IndexLattice",
                                               "IndexRowwiseMinMaxBase") if hasattr(faiss, n))
    if not isinstance(inner, codecs):
        raise M3Error(f"{factory!r} is not a vector codec FAISS can encode and decode alone (sa_encode/"
                      "sa_decode): a memory is stored as its code; use a quantizer such as PQ8x4, OPQ8,PQ8x4 "
                      "or RQ8x4") from None
    # the factory's PQ turns on polysemous training (a code reordering for Hamming search): a
    # codec never searches, and it costs 20x the training time
    for sub in (index, getattr(faiss.downcast_index(index), "index", None)):
        sub = faiss.downcast_index(sub) if sub is not None else None
        if isinstance(sub, faiss.IndexPQ):
            sub.do_polysemous_training = False
    return index


_INDEX = threading.local()  # TableDecoder's index buffers, per thread


class _Pool:
    """Threads for TableDecoder's C lookups of a large batch (the C loop releases the GIL), sized to
    FAISS's OpenMP thread count (OMP_NUM_THREADS, faiss.omp_set_num_threads): the knob FAISS's own
    sa_decode follows, so the two decoders run on as many threads. Made on first use; a forked child
    makes its own (a parent's threads do not survive a fork)."""

    _lock = threading.Lock()
    _pool = None  # (threads, ThreadPoolExecutor)

    @classmethod
    def get(cls, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        with cls._lock:
            if cls._pool is None or cls._pool[0] != threads:  # a replaced pool is not shut down: a caller
                # may still hold it; its idle threads end when it is collected
                cls._pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="m3-decode"))
            return cls._pool[1]

    @classmethod
    def forget(cls):
        cls._pool, cls._lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Pool.forget)


class TableDecoder:
    """sa_decode of a plain product quantizer (IndexPQ with 4- or 8-bit codes) as one table lookup.

    FAISS decodes PQ codes vector by vector through its bit reader; here each code byte of all N
    vectors indexes one table of rows of floats at once, which gives the same floats (a copy, no
    arithmetic) several times faster (benchmarks/quant_frontier.py prints both).
    Code layout (FAISS PQEncoder8 / PQEncoderGeneric): byte m holds sub-code m at 8 bits; at 4 bits
    byte j holds sub-code 2j in its low nibble and 2j+1 in its high one, so at 4 bits a byte value
    indexes a row of both sub-vectors (built once from the centroids): one lookup a code byte.

    The lookups run in C (m3compile/_lookup.c) where setup.py could build it: eight code bytes read
    at once and each row copied with one move, ~2x numpy's take below (the default preset at D = 80:
    40 lookups a vector, ~0.55 against ~1.1 ns a lookup on a 2-core AMD EPYC). `native` (class
    attribute) False, or no compiled module, takes numpy's path, the same floats.

    numpy's path: the lookups are what bounds the decode (one core writes the floats ~3x faster), so the index
    of byte j of a vector, j·256 + byte, is not computed: a per-thread buffer of BLOCK vectors ×
    C native ints (one per C, shared by every decoder of C code bytes) holds j in bytes 1-2 of each
    int from the start, and a call writes the code bytes into byte 0 (little-endian; a big-endian
    machine adds the offsets instead). `take` with mode="clip" clamps where the default raises,
    which lets it write straight into `out` (no index can be out of range: a byte is at most 255).
    """

    BLOCK = 1024  # vectors an index buffer serves at once: C x 8 KB, in L2
    SMALL = 32  # up to this many vectors (a frame's worth) the offsets are added: less overhead
    native = True  # the C lookups where m3compile._lookup was built (tests set False for numpy's path)
    # code bytes from which a call's C lookups are shared among FAISS's OpenMP threads (a thread's part
    # at least ~50 us, a pool handoff's: 2^18 bytes are ~6,500 vectors at D = 80, ~150 us on one AMD EPYC
    # core). 20,000 vectors at D = 80 on 2 threads: 1.3-1.5x one (quant_frontier.speed80, 2026-12-07)
    PARALLEL_BYTES = 1 << 18

    def __init__(self, pq):
        m, nbits, dsub = int(pq.M), int(pq.nbits), int(pq.dsub)
        c = faiss.vector_to_array(pq.centroids).reshape(m, 1 << nbits, dsub)  # (M, ksub, dsub)
        if nbits == 4:  # row b of byte j: centroid b & 15 of sub-code 2j, then b >> 4 of 2j + 1
            b = np.arange(256)
            c = np.concatenate([c[0::2][:, b & 15], c[1::2][:, b >> 4]], axis=2)  # (M/2, 256, 2 dsub)
        self.n_bytes, self.row = c.shape[0], c.shape[2]  # C, floats a row
        assert self.n_bytes < 1 << 16, self.n_bytes  # j fits bytes 1-2 of the index
        self.table = np.ascontiguousarray(c.reshape(self.n_bytes * 256, self.row))  # (C*256, row)
        self._offsets = np.arange(self.n_bytes, dtype=np.intp) * 256  # (C,)

    @classmethod
    def of(cls, codec) -> "TableDecoder | None":
        """The table decoder of `codec`, or None where it is not a plain 4/8-bit PQ (FAISS decodes)."""
        index = faiss.downcast_index(codec)
        if type(index) is not faiss.IndexPQ or index.pq.nbits not in (4, 8):
            return None
        if index.pq.nbits == 4 and index.pq.M % 2:
            return None  # an odd count of 4-bit codes ends in a half byte; FAISS decodes those
        return cls(index.pq)

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """This thread's (bytes (BLOCK, C, 8) uint8, their ints (BLOCK, C) intp), j in bytes 1-2."""
        mine = getattr(_INDEX, "by_bytes", None)  # C -> this thread's buffer
        if mine is None:
            mine = _INDEX.by_bytes = {}
        if self.n_bytes not in mine:
            raw = np.zeros((self.BLOCK, self.n_bytes, np.dtype(np.intp).itemsize), np.uint8)
            raw[:, :, 1:3] = np.arange(self.n_bytes, dtype="<u2").view(np.uint8).reshape(self.n_bytes, 2)
            mine[self.n_bytes] = (raw, raw.view(np.intp)[..., 0])
        return mine[self.n_bytes]

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """(N, C) uint8 -> (N, D) float32."""
        assert codes.dtype == np.uint8 and codes.ndim == 2 and codes.shape[1] == self.n_bytes, (codes.dtype, codes.shape)
        n = codes.shape[0]
        if _lookup is not None and self.native and self.table.dtype.isnative:  # C copies raw bytes: native floats only
            out = np.empty((n, self.n_bytes * self.row), np.float32)  # (N, D)
            codes = np.ascontiguousarray(codes)
            threads = faiss.omp_get_max_threads() if codes.size >= self.PARALLEL_BYTES else 1
            if threads <= 1:
                _lookup.take_rows(self.table, codes, out, self.n_bytes, self.row * 4)
                return out
            cuts = [n * i // threads for i in range(threads + 1)]  # contiguous row ranges, one a thread
            pool = _Pool.get(threads)
            parts = [pool.submit(_lookup.take_rows, self.table, codes[a:b], out[a:b], self.n_bytes, self.row * 4)
                     for a, b in zip(cuts, cuts[1:])]
            for part in parts:
                part.result()
            return out
        if n <= self.SMALL or sys.byteorder != "little":  # the buffer's byte layout is little-endian
            idx = codes.astype(np.intp)  # (N, C)
            idx += self._offsets
            return self.table.take(idx, axis=0, mode="clip").reshape(n, self.n_bytes * self.row)  # (N, D)
        out = np.empty((n, self.n_bytes, self.row), np.float32)  # (N, C, row)
        raw, idx = self._index()
        for lo in range(0, n, self.BLOCK):
            hi = min(n, lo + self.BLOCK)
            raw[:hi - lo, :, 0] = codes[lo:hi]
            self.table.take(idx[:hi - lo], axis=0, mode="clip", out=out[lo:hi])
        return out.reshape(n, self.n_bytes * self.row)  # (N, D)


class GridEncoder:
    """sa_encode of a plain product quantizer with 2-dim subvectors and 8-bit codes, as one lookup
    per subvector: the codes FAISS gives, except near the border of two centroids' regions.

    Each subspace's plane, over its centroids' range widened by a tenth of it on each side, is cut
    into GRID x GRID cells; a cell holds the code FAISS's encoder gives the cell's centre (built with
    one sa_encode call of GRID² vectors). A vector's subvector takes its cell's code, in float32
    arithmetic that is the same on every machine; outside the range, the nearest edge cell's. So a
    subvector inside the range is at most the cell's diagonal farther from its code's centroid than
    from the nearest one (measured at D = 80 with GRID 256: 5-8 % of subvectors get another
    centroid, the squared error is 0.8-1.6 % higher); one far outside may be farther still. Encoding
    runs 9-17x FAISS's search (benchmarks/quant_frontier.py).
    """

    GRID, MARGIN = 256, 0.1

    def __init__(self, codec):
        pq = faiss.downcast_index(codec).pq
        self.m, G = int(pq.M), self.GRID
        c = faiss.vector_to_array(pq.centroids).reshape(self.m, 256, 2).astype(np.float64)  # (M, 256, 2)
        lo, hi = c.min(1), c.max(1)  # (M, 2)
        span = np.maximum(hi - lo, 1e-12)
        lo, hi = lo - self.MARGIN * span, hi + self.MARGIN * span
        self.lo = lo.reshape(-1).astype(np.float32)  # (D,)
        self.scale = (G / (hi - lo)).reshape(-1).astype(np.float32)  # (D,) cells per unit
        centre = self.lo[None] + ((np.arange(G, dtype=np.float32)[:, None] + np.float32(0.5)) / self.scale[None])  # (G, D)
        cx, cy = centre[:, 0::2], centre[:, 1::2]  # (G, M) each
        pts = np.empty((G, G, self.m, 2), np.float32)  # cell (i, j) of every subspace at once
        pts[..., 0], pts[..., 1] = cx[:, None, :], cy[None, :, :]
        codes = codec.sa_encode(np.ascontiguousarray(pts.reshape(G * G, 2 * self.m)))  # (G², M)
        self.table = np.ascontiguousarray(codes.T).reshape(-1)  # (M·G²,): subspace m's cell i·G+j
        self.offsets = (np.arange(self.m, dtype=np.int32) * G * G)[None]  # (1, M)

    @staticmethod
    def fits(codec) -> bool:
        """Whether the grid can encode `codec`: a plain PQ of 2-dim subvectors and 8-bit codes (cheap:
        the table is built when a vector is first encoded, so a reader that only decodes builds none)."""
        index = faiss.downcast_index(codec)
        return type(index) is faiss.IndexPQ and index.pq.nbits == 8 and index.pq.dsub == 2

    @staticmethod
    def describe(codec) -> str:
        index = faiss.downcast_index(codec)
        pq = getattr(index, "pq", None)
        return (f"{type(index).__name__} with {pq.dsub}-dim subvectors and {pq.nbits}-bit codes" if pq is not None
                else type(index).__name__)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, M) uint8 codes."""
        # clipped before the cast: a float beyond int32 casts to INT_MIN on x86 and saturates on ARM
        g = np.clip((x - self.lo) * self.scale, 0, self.GRID - 1).astype(np.int32)  # (N, D) cell coordinates
        cell = g[:, 0::2] * self.GRID + g[:, 1::2] + self.offsets  # (N, M)
        return self.table.take(cell)


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of min(n, k) of n rows."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def collect_samples(memories, max_vectors: int = MAX_TRAIN, seed: int = 0) -> dict[tuple[int, str], np.ndarray]:
    """Training samples from memories: {(layer, role): (N, H, D) float32}, N kept tokens.

    Args:
        memories: a sequence of objects with .keys/.values (L, H, K, D) (SparseKV or kb Memory), in
            a fixed order (e.g. the seeded reference sample of `sample_rows`).
        max_vectors: where the memories hold more tokens than this, a seeded uniform subset of them
            (in their order) that holds at least this many. Before, the first memories up to it were
            taken: with top-k 64 and 2,048 sampled references, the first half of the corpus only.
        seed: seeds that subset.
    """
    import torch

    memories = list(memories)
    counts = [int(m.keys.shape[2]) for m in memories]
    chosen = range(len(memories))
    if sum(counts) > max_vectors:
        order, total, take = np.random.default_rng(seed).permutation(len(memories)), 0, []
        for i in order:
            take.append(int(i))
            total += counts[i]
            if total >= max_vectors:
                break
        chosen = sorted(take)
    out: dict[tuple[int, str], list[np.ndarray]] = {}
    for i in chosen:
        for role, x in (("k", memories[i].keys), ("v", memories[i].values)):
            x = torch.as_tensor(x).detach().float().cpu().numpy()  # (L, H, K, D)
            for layer in range(x.shape[0]):
                out.setdefault((layer, role), []).append(x[layer].transpose(1, 0, 2))  # (K, H, D)
    return {key: np.ascontiguousarray(np.concatenate(v)) for key, v in out.items()}  # (N, H, D) each


def digest(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Codebooks.sha256 of a codebooks file's raw parts (its tensors' bytes and string metadata), as
    written: what a reader compares with the manifest before FAISS reads any codec."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


@dataclass
class Codebooks:
    factory: str  # FAISS factory string of every codec
    d: int  # D
    group: str  # one of GROUPS
    seed: int  # training seed
    n_layers: int  # L
    n_heads: int  # H
    codecs: dict  # codec name -> trained FAISS index
    n_train: dict  # codec name -> training vectors used
    encoder: str = "faiss"  # "faiss" (each codec's sa_encode) or "grid" (GridEncoder)
    _decoders: dict = field(default_factory=dict, repr=False, compare=False)  # name -> TableDecoder | None
    _encoders: dict = field(default_factory=dict, repr=False, compare=False)  # name -> GridEncoder

    @property
    def code_size(self) -> int:
        return next(iter(self.codecs.values())).sa_code_size()

    def centroids(self) -> int | None:
        """Centroids of each k-means a product quantizer's training runs (2^bits), else None."""
        index = faiss.downcast_index(next(iter(self.codecs.values())))
        index = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        pq = getattr(index, "pq", None)
        return int(pq.ksub) if pq is not None and hasattr(pq, "ksub") else None

    def codec(self, layer: int, role: str, head: int = 0):
        name = codec_name(self.group, layer, head, role)
        assert name in self.codecs, (name, sorted(self.codecs))
        return self.codecs[name]

    def encode(self, layer: int, role: str, x: np.ndarray, head: int = 0) -> np.ndarray:
        """(N, D) float32 -> (N, C) uint8 codes."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, D)
        assert x.ndim == 2 and x.shape[1] == self.d, (x.shape, self.d)
        if self.encoder == "grid":
            name = codec_name(self.group, layer, head, role)
            if name not in self._encoders:
                self._encoders[name] = GridEncoder(self.codec(layer, role, head))
            return self._encoders[name](x)  # (N, C)
        return self.codec(layer, role, head).sa_encode(x)  # (N, C)

    def decode(self, layer: int, role: str, codes: np.ndarray, head: int = 0) -> np.ndarray:
        """(N, C) uint8 codes -> (N, D) float32."""
        codes = np.ascontiguousarray(codes, dtype=_CODE)  # (N, C)
        assert codes.ndim == 2 and codes.shape[1] == self.code_size, (codes.shape, self.code_size)
        name = codec_name(self.group, layer, head, role)
        if name not in self._decoders:
            self._decoders[name] = TableDecoder.of(self.codec(layer, role, head))
        fast = self._decoders[name]
        return fast(codes) if fast is not None else self.codecs[name].sa_decode(codes)  # (N, D)

    def nbytes(self) -> int:
        """Stored bytes of all codecs (what a kb amortises over its memories)."""
        return sum(int(faiss.serialize_index(c).size) for c in self.codecs.values())

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """{"codec.<name>": uint8 serialize_index bytes} and string metadata (formats/vq-codebooks.md)."""
        tensors = {f"codec.{n}": faiss.serialize_index(self.codecs[n]) for n in sorted(self.codecs)}
        meta = {"format": FORMAT, "format_version": "1" if self.encoder == "faiss" else "2", "factory": self.factory,
                "d": str(self.d), "code_size": str(self.code_size), "group": self.group, "seed": str(self.seed),
                "n_layers": str(self.n_layers), "n_heads": str(self.n_heads), "roles": ",".join(ROLES),
                "n_train": json.dumps(self.n_train, sort_keys=True),
                "sha256": json.dumps({n: hashlib.sha256(t.tobytes()).hexdigest() for n, t in tensors.items()},
                                     sort_keys=True)}
        if self.encoder != "faiss":
            meta["encoder"] = self.encoder
        return tensors, meta

    def sha256(self) -> str:
        """One digest of every codec's bytes and the metadata, for the manifest and content keys."""
        return digest(*self.to_tensors())

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                     where: str = "codebooks") -> "Codebooks":
        """Rebuild codecs from `to_tensors` output; M3Error naming the bad tensor or field."""
        if metadata.get("format") != FORMAT:
            raise M3Error(f"{where}: format is {metadata.get('format')!r}, not {FORMAT!r}; not m3 VQ codebooks")
        try:
            version = int(metadata["format_version"])
            d, code_size, seed = int(metadata["d"]), int(metadata["code_size"]), int(metadata["seed"])
            n_layers, n_heads = int(metadata["n_layers"]), int(metadata["n_heads"])
            factory, group = metadata["factory"], metadata["group"]
            n_train, digests = json.loads(metadata["n_train"]), json.loads(metadata["sha256"])
        except (KeyError, ValueError) as e:
            raise M3Error(f"{where}: metadata field {e} is missing or malformed; the codebook file is damaged, "
                          "recompile the kb") from None
        if version > FORMAT_VERSION:
            raise M3Error(f"{where}: format_version {version} is newer than this m3compile reads "
                          f"({FORMAT_VERSION}); upgrade m3compile")
        if group not in GROUPS:
            raise M3Error(f"{where}: group {group!r} is not one of {GROUPS}; the codebook file is damaged")
        encoder = metadata.get("encoder", "faiss")
        if encoder not in ENCODER_NAMES or (encoder != "faiss") != (version >= 2):
            raise M3Error(f"{where}: encoder {encoder!r} (format_version {version}) is not one of "
                          f"{', '.join(ENCODER_NAMES)}; the codebook file is damaged")
        want = sorted({codec_name(group, l, h, r) for l in range(n_layers) for h in range(n_heads) for r in ROLES})
        codecs = {}
        for name in want:
            key = f"codec.{name}"
            t = tensors.get(key)
            if t is None:
                raise M3Error(f"{where}: tensor {key} is missing; the codebook file is damaged, recompile the kb")
            t = np.ascontiguousarray(t, dtype=np.uint8)
            if hashlib.sha256(t.tobytes()).hexdigest() != digests.get(key):
                raise M3Error(f"{where}: tensor {key} does not match its sha256; the codebook file is damaged, "
                              "recompile the kb (or `m3 verify --repair`)")
            try:
                codec = faiss.deserialize_index(t)
            except RuntimeError:
                raise M3Error(f"{where}: tensor {key} is not a FAISS codec; the codebook file is damaged") from None
            if codec.d != d or codec.sa_code_size() != code_size:
                raise M3Error(f"{where}: tensor {key} is a {codec.d}-dim codec of {codec.sa_code_size()} bytes, "
                              f"but the metadata says d={d}, code_size={code_size}; the codebook file is damaged")
            if encoder == "grid" and not GridEncoder.fits(codec):
                raise M3Error(f"{where}: encoder 'grid' needs a plain PQ with 2-dim subvectors and 8-bit codes, but "
                              f"{key} is a {GridEncoder.describe(codec)}; the codebook file is damaged")
            codecs[name] = codec
        return cls(factory, d, group, seed, n_layers, n_heads, codecs, {k: int(v) for k, v in n_train.items()}, encoder)


def train_codecs(samples: dict[tuple[int, str], np.ndarray], factory: str, seed: int, group: str = "layer",
                 max_train: int = MAX_TRAIN, encoder: str = "faiss") -> Codebooks:
    """Train one codec per group on a bounded, seeded sample of the memories' vectors.

    Args:
        samples: {(memory-layer index, "k" or "v"): (N, H, D) float32}, e.g. from `collect_samples`;
            (N, D) is read as H = 1.
        factory: a FAISS index factory string for a standalone codec, e.g. "PQ8x4".
        seed: seeds the row sample and every FAISS clustering.
        group: "layer" (per layer and role), "head" (per layer, head and role), "role", or "all".
        max_train: at most this many vectors per codec, sampled uniformly with `seed`.
        encoder: "faiss" (each codec's sa_encode) or "grid" (GridEncoder: a plain PQ with 2-dim
            subvectors and 8-bit codes), recorded in the codebooks.
    Returns:
        Codebooks, whose bytes do not depend on the thread count (see the module docstring).
    Example:
        >>> cb = train_codecs(collect_samples(mems), "PQ8x4", seed=0)
        >>> VQScheme(cb).quantize(mem.keys, role="k")
    """
    if group not in GROUPS:
        raise M3Error(f"codebook group {group!r} is not one of {', '.join(GROUPS)}")
    if encoder not in ENCODER_NAMES:
        raise M3Error(f"encoder {encoder!r} is not one of {', '.join(ENCODER_NAMES)}")
    probe = build_codec(factory, next(iter(samples.values())).shape[-1])
    if encoder == "grid" and not GridEncoder.fits(probe):
        raise M3Error(f"the grid encoder needs a plain PQ with 2-dim subvectors and 8-bit codes, but {factory!r} is a "
                      f"{GridEncoder.describe(probe)}; use the factory PQ<D/2>x8 or the faiss encoder")
    samples = {k: (v[:, None] if v.ndim == 2 else v) for k, v in samples.items()}  # (N, H, D)
    n_layers = 1 + max(l for l, _ in samples)
    n_heads, d = next(iter(samples.values())).shape[1:]
    assert set(samples) == {(l, r) for l in range(n_layers) for r in ROLES}, sorted(samples)
    pools: dict[str, list[np.ndarray]] = {}
    for (layer, role), x in sorted(samples.items()):
        assert x.shape[1:] == (n_heads, d), (x.shape, n_heads, d)
        for h in range(n_heads):
            pools.setdefault(codec_name(group, layer, h, role), []).append(x[:, h])  # (N, D)
    codecs, n_train = {}, {}
    for i, name in enumerate(sorted(pools)):
        x = np.concatenate(pools[name]).astype(np.float32)  # (N, D)
        x = np.ascontiguousarray(x[sample_rows(len(x), max_train, seed + i)])  # (n, D)
        codec = build_codec(factory, d)
        _set_seeds(codec, (seed + i) % 2**31)  # FAISS's seeds are 32-bit ints: the same for every seed + i below
        try:
            with _training_threads(codec):
                codec.train(x)
        except RuntimeError as e:
            raise M3Error(f"training codec {name} ({factory}) on {len(x)} vectors failed: "
                          f"{str(e).strip().splitlines()[-1][:200]}; the kb may be too small for this "
                          "quantizer (k-means needs at least as many vectors as centroids): use a smaller "
                          "one such as vq-pq4 (PQ with 4-bit codes: 16 centroids)") from None
        codecs[name], n_train[name] = codec, len(x)
    return Codebooks(factory, d, group, seed, n_layers, n_heads, codecs, n_train, encoder)


class VQScheme:
    """quantize.Scheme over trained codebooks: one code array (L, H, K, C) uint8 per role.

    quantize/dequantize take the role ("k" or "v"): keys and values have their own codecs.
    """

    per_role = True  # pack.encode_payload/decode_payload pass role= to schemes that say so

    def __init__(self, codebooks: Codebooks, name: str | None = None):
        self.codebooks = codebooks
        self.name = name or f"vq:{codebooks.factory}"

    def parts(self, shape):
        L, H, K, D = shape
        cb = self.codebooks
        if (L, H, D) != (cb.n_layers, cb.n_heads, cb.d):  # a damaged frame header, or another kb's frame
            raise M3Error(f"payload (L, H, D) = {(L, H, D)}, but the codebooks code {(cb.n_layers, cb.n_heads, cb.d)}; "
                          "the frame is damaged or not this kb's")
        return (PartSpec("codes", _CODE, (L, H, K, self.codebooks.code_size)),)

    def _per_codec(self, shape):
        # (layer, head or None): one call per codec, all heads at once when they share it
        L, H = shape[:2]
        if self.codebooks.group == "head":
            return [(l, h) for l in range(L) for h in range(H)]
        return [(l, None) for l in range(L)]

    @property
    def batch_encode(self) -> bool:
        """Whether a call's codes are each vector's own, whatever else the call holds, so a batch
        of references may be encoded in one call (quantize_batch). True for a plain PQ whose
        subvectors are under 16 dims: FAISS then finds each subvector's nearest centroid directly;
        from 16 dims it computes distance tables with BLAS over the call, and LSQ starts every call
        from seeded random codes, so those (and RQ, OPQ) encode one reference a call."""
        index = faiss.downcast_index(next(iter(self.codebooks.codecs.values())))
        return type(index) is faiss.IndexPQ and int(index.pq.dsub) < 16

    def _codes(self, x: np.ndarray, role: str) -> np.ndarray:
        """(B, L, H, K, D) float32 -> (B, L, H, K, C) codes, one encode call per codec."""
        B, L, H, K, D = x.shape
        codes = np.empty((B, L, H, K, self.codebooks.code_size), _CODE)
        for l, h in self._per_codec((L, H)):
            hs = slice(None) if h is None else slice(h, h + 1)
            xs = x[:, l, hs].reshape(-1, D)  # (B*h*K, D)
            codes[:, l, hs] = self.codebooks.encode(l, role, xs, h or 0).reshape(codes[:, l, hs].shape)
        return codes

    def _decoded(self, codes: np.ndarray, role: str) -> np.ndarray:
        """(B, L, H, K, C) codes -> (B, L, H, K, D) float32."""
        B, L, H, K, _ = codes.shape
        out = np.empty((B, L, H, K, self.codebooks.d), np.float32)
        for l, h in self._per_codec((L, H)):
            hs = slice(None) if h is None else slice(h, h + 1)
            c = codes[:, l, hs].reshape(-1, codes.shape[-1])  # (B*h*K, C)
            out[:, l, hs] = self.codebooks.decode(l, role, c, h or 0).reshape(out[:, l, hs].shape)
        return out

    @staticmethod
    def _checked(x) -> np.ndarray:
        import torch

        x = torch.as_tensor(x).detach().to("cpu", torch.float32).numpy()
        if not np.isfinite(x).all():
            raise M3Error("memory keys/values contain NaN or inf; check the checkpoint and the compute dtype")
        return x

    def quantize(self, x, role: str) -> tuple[QuantKV, QuantError]:
        x = self._checked(x)  # (L, H, K, D)
        (spec,) = self.parts(x.shape)
        codes = self._codes(x[None], role)[0]  # (L, H, K, C)
        assert codes.shape == spec.shape, (codes.shape, spec.shape)
        return QuantKV(self.name, tuple(x.shape), (codes,)), _error(x, self._decoded(codes[None], role)[0])

    def quantize_batch(self, x, role: str) -> tuple[QuantKV, list[QuantError]]:
        """quantize of each x[b] alone (B, L, H, K, D), in one encode call per codec: the same codes
        and float64 error sums (tests/test_vq.py); only where batch_encode says a call's codes are
        each vector's own (pack.encode_payloads asks)."""
        assert self.batch_encode, self.codebooks.factory
        x = self._checked(x)  # (B, L, H, K, D)
        self.parts(x.shape[1:])  # the shape check
        codes = self._codes(x, role)  # (B, L, H, K, C)
        return QuantKV(self.name, tuple(x.shape), (codes,)), _errors(x, self._decoded(codes, role))

    def dequantize(self, q: QuantKV, role: str) -> "torch.Tensor":
        import torch  # here, not at the top: reading a kb's codebooks (m3 inspect) needs no torch

        (codes,) = q.parts  # (L, H, K, C)
        return torch.from_numpy(self._decoded(codes[None], role)[0])


def bits_per_element(code_size: int, d: int) -> float:
    """Code bits per key/value element, before positions, headers and codebooks."""
    return 8 * code_size / d

