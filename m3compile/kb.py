"""open_kb: read a compiled knowledge base (formats/README.md).

The manifest is read first and checked; references.parquet is read on demand; a memory is read by
slicing its one zstd frame out of its shard, without touching its neighbours.

Shape letters: L memory layers, H kv heads, K kept tokens, D head dim.
"""

import operator
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from m3compile import references as refs_file
from m3compile.errors import REPAIR_HINT, M3Error, damaged_file
from m3compile.manifest import Manifest, read_manifest
from m3compile.pack import RefLocation, ascending_below, decode_payload, open_frame, read_payload
from m3compile.spec import MemorySpec

if TYPE_CHECKING:  # memories are torch tensors, made by pack.decode_payload: opening a kb, its
    import torch  # manifest, references and index (m3 query, m3 inspect) needs no torch (~1.5 s)


FEW_ROWS = 1024  # up to this many rows asked of a kb whose table was not read: its row groups are read


@dataclass(frozen=True)
class Memory:
    ref_id: int
    keys: "torch.Tensor"  # (L, H, K, D) float32, dequantized, post-RoPE at positions p + j
    values: "torch.Tensor"  # (L, H, K, D) float32, dequantized
    positions: "torch.Tensor"  # (L, H, K) int64, kept token index j in the reference
    layers: tuple[int, ...]  # the model layer of each of the L entries


class KnowledgeBase:
    """A compiled kb. Use `open_kb(path)`."""

    def __init__(self, path: Path, cache_size: int = 256):
        self.path = Path(path)
        # decoded memories, most recently used last: neighbouring chunks often retrieve the same refs
        self._cache: OrderedDict[int, Memory] = OrderedDict()
        self.cache_size = cache_size
        self._stamp = _manifest_stamp(self.path)  # before reading it: a commit after is seen as one
        self.manifest: Manifest = read_manifest(self.path)
        self.spec: MemorySpec = load_spec(self.path, self.manifest)  # the write recipe of every memory here
        self.layers = self.spec.memory_layers
        self.prefix_ids = self.spec.prefix_ids
        self.scheme = self.spec.scheme
        self._max_bytes = self.spec.max_payload()
        self._table: pa.Table | None = None
        self._ids: tuple | None = None  # (ref ids in table order, their sorting permutation), (R,) each
        self._loc: tuple | None = None  # (ref ids, shard codes, shard names, offsets, lengths), by ref id
        self._groups: "refs_file.RowGroups | None" = None  # the table's row groups by ref id (a few rows read)
        self._retriever = None

    @property
    def references_path(self) -> Path:
        return self.path / self.manifest.paths["references"]

    def references(self) -> pa.Table:
        """All reference rows: ref_id, doc_id, source, index, char_start, char_end, n_tokens, token_ids,
        text, n_kept, shard, byte_offset, byte_length, quant_rel_err, quant_max_err, ref_key,
        doc_sha256 (formats/references.md)."""
        if self._table is None:
            with self._stale_checked():
                self._table = refs_file.read_references(self.references_path)
        return self._table

    @contextmanager
    def _stale_checked(self):
        """An M3Error inside names a new commit, where one replaced the manifest since this kb was
        opened: its shards and generation may be gone, and the kb is whole (a repair would be the
        wrong advice)."""
        try:
            yield
        except M3Error as e:
            if _manifest_stamp(self.path) == self._stamp:
                raise
            raise M3Error(f"{self.path} was committed again since it was opened (by a compile, `m3 compact` or a "
                          f"repair), and what this reader held moved ({str(e).split('; ')[0]}); open the kb "
                          "again") from None

    def reference_rows(self, ref_ids, columns: list[str] | None = None) -> list[dict]:
        """The rows of these references, in the order given (a ref id not in the kb is left out);
        only those rows become Python objects, not the whole table. A few rows of a kb whose table
        was not read are taken from the row groups that hold them (`m3 query`, `m3 inspect --ref`
        read 2 of SciFact's 37 groups, not the 150k rows)."""
        want = np.asarray([int(i) for i in ref_ids], np.int64)  # (Q,)
        cols = None if columns is None else list(dict.fromkeys(["ref_id", *columns]))
        if self._table is None and len(want) <= FEW_ROWS:
            with self._stale_checked():
                if self._groups is None:
                    self._groups = refs_file.RowGroups(self.references_path)
                t = self._groups.read(want, cols)
            ids = refs_file.int64_column(t.column("ref_id"))
            order = np.argsort(ids, kind="stable")
        else:
            if self._ids is None:
                ids = refs_file.int64_column(self.references().column("ref_id"))  # (R,) table order
                self._ids = ids, np.argsort(ids, kind="stable")  # (R,) each: the table is in ref id order anyway
            ids, order = self._ids
            t = self.references() if cols is None else self.references().select(cols)
        at = order[np.minimum(np.searchsorted(ids, want, sorter=order), max(len(ids) - 1, 0))] if len(ids) else want[:0]
        at = at[ids[at] == want] if len(ids) else at  # (Q',) table rows of the ids found, in the order asked
        return t.take(pa.Array.from_buffers(pa.int64(), len(at), [None, pa.py_buffer(np.ascontiguousarray(at, np.int64))])).to_pylist()

    def _locations(self) -> tuple:
        """(ref ids ascending, shard codes, shard names, byte offsets, byte lengths): the location
        columns held as arrays, 28 bytes a row (a dict of RefLocation objects was ~200)."""
        if self._loc is None:
            t = refs_file.read_references(self.references_path, ["ref_id", "shard", "byte_offset", "byte_length"])
            ids = refs_file.int64_column(t.column("ref_id"))  # (R,) table order
            order = np.argsort(ids, kind="stable")
            # encoded chunk by chunk against one dictionary: the names joined in one array would
            # pass 2 GiB of offsets at ~90M references
            shard = t.column("shard").dictionary_encode().unify_dictionaries()
            codes = np.concatenate([np.zeros(0, np.int64), *(refs_file.dictionary_indices(c.indices)
                                                             for c in shard.chunks)])  # (R,)
            names = shard.chunks[0].dictionary.to_pylist() if shard.num_chunks else []
            self._loc = (ids[order], codes[order], names,
                         refs_file.int64_column(t.column("byte_offset"))[order],
                         refs_file.int64_column(t.column("byte_length"))[order])
        return self._loc

    def _location(self, ref_id: int) -> RefLocation | None:
        """Where a reference's frame lies, or None."""
        ids, codes, names, offsets, lengths = self._locations()
        k = int(np.searchsorted(ids, ref_id))
        if k >= len(ids) or ids[k] != ref_id:
            return None
        return RefLocation(ref_id, names[codes[k]], int(offsets[k]), int(lengths[k]))

    def __len__(self) -> int:
        return len(self._locations()[0])

    def ids_hint(self) -> str:
        """Which ref ids exist, for an error about one that does not: after incremental compiles
        and `m3 compact` they need not start at 0 nor be contiguous."""
        ids = self._locations()[0]
        if not len(ids):
            return "it holds no references"
        gaps = "" if int(ids[-1]) - int(ids[0]) + 1 == len(ids) else ", with gaps"
        return f"{len(ids)} references, ref ids {ids[0]}..{ids[-1]}{gaps}"

    def memory(self, ref_id: int) -> Memory:
        """One reference's memory, dequantized.

        Args:
            ref_id: a `ref_id` of references().
        Returns:
            Memory with keys/values (L, H, K, D) float32, positions (L, H, K), layers.
        Example:
            >>> kb = open_kb("kb/"); m = kb.memory(0); m.keys.shape  # the embedded reader: layer 3, 2 kv heads
            torch.Size([1, 2, 5, 32])
        """
        try:
            if isinstance(ref_id, (bool, np.bool_)):  # operator.index(True) is 1: another reference's memory
                raise TypeError
            ref_id = operator.index(ref_id)  # ints and numpy integers; 1.7 or "3" is not an id
        except TypeError:
            raise M3Error(f"a ref id is an integer, not {ref_id!r}; see `m3 inspect`") from None
        if ref_id in self._cache:
            self._cache.move_to_end(ref_id)
            return self._cache[ref_id]
        keys, values, positions = self._split_frame(ref_id, decode_payload)
        mem = Memory(ref_id, keys, values, positions, self.layers)
        if self.cache_size > 0:
            self._cache[ref_id] = mem
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return mem

    def kept_positions(self, ref_id: int) -> np.ndarray:
        """(L, H, K) the kept token positions of a reference's memory, read from its frame without
        dequantizing it (no torch: `m3 inspect --ref` took 1.1 s more for its import)."""
        if ref_id in self._cache:
            return self._cache[ref_id].positions.numpy()
        return self._split_frame(ref_id, open_frame)[2]

    def _split_frame(self, ref_id: int, split):
        """split(frame, scheme, max bytes, where) of a reference's frame (pack.decode_payload:
        dequantized; pack.open_frame: not); any fault is one M3Error naming it, with the repair hint."""
        with self._stale_checked():
            loc = self._location(ref_id)
            if loc is None:
                raise M3Error(f"no reference {ref_id} in {self.path} ({self.ids_hint()}); see `m3 inspect`")
            return self._split_checked(ref_id, loc, split, f"{loc.shard} reference {ref_id}")

    def _split_checked(self, ref_id: int, loc, split, where: str):
        try:
            keys, values, positions = split(read_payload(self.path / loc.shard, loc), self.scheme, self._max_bytes, where)
            # a frame of another shape, or kept positions out of order or range, decodes as well as a
            # good one (the header says its own shape): what `m3 verify` checks, checked here too
            L, H, K, D = tuple(keys.shape)
            pos = np.asarray(positions)
            if (L, H, D) != (len(self.layers), self.spec.n_kv_heads, self.spec.head_dim) or K > self.spec.top_k \
                    or (pos.size and not ascending_below(pos, self.spec.width)):
                raise M3Error(f"{where}: payload of shape {(L, H, K, D)} or its kept positions do not fit this kb "
                              f"(layers {len(self.layers)}, heads {self.spec.n_kv_heads}, head dim {self.spec.head_dim}, "
                              f"top-k {self.spec.top_k}, width {self.spec.width}); the shard is damaged")
            return keys, values, positions
        except M3Error as e:
            text = str(e) if where in str(e) else f"{where}: {e}"
            raise M3Error(f"{text.split('; ')[0]}; {REPAIR_HINT.format(kb=self.path)}") from None
        except OSError as e:
            raise M3Error(f"{where}: cannot read the shard ({e.strerror or e}); "
                          f"{REPAIR_HINT.format(kb=self.path)}") from None

    def memories(self, ref_ids) -> list[Memory]:
        return [self.memory(i) for i in ref_ids]

    def retrieve(self, text: str, k: int = 5, mode: str | None = None, max_overlap: float | None = None,
                 min_relative_score: float = 0.0):
        """The k references nearest `text`, best first, as Hit(ref_id, score).

        Args:
            text: the query.
            k: how many.
            mode: "bm25", "dense" or "hybrid" (default: the kb's).
            max_overlap: drop references whose overlap with the query (paper Eq. 6) exceeds this.
            min_relative_score: drop references scoring under this fraction of the best (0: none;
                generation reads the model's, formats/model-memory.md `reading`).
        Example:
            >>> open_kb("kb/").retrieve("river trade in the north", k=3)
            [Hit(ref_id=12, score=1.5), ...]  # bm25 with document context: 1.0 to 1.5 for the best
        """
        with self._stale_checked():
            if self._retriever is None:
                from m3compile.retrieve import Retriever

                self._retriever = Retriever.open(self.path, self.manifest.to_dict())
            return self._retriever.retrieve(text, k, mode=mode, max_overlap=max_overlap,
                                            min_relative_score=min_relative_score)


def _manifest_stamp(kb_dir: Path) -> tuple | None:
    """What changes when a commit replaces manifest.json (a rename over it: a new inode)."""
    try:
        st = (Path(kb_dir) / "manifest.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load_spec(kb_dir: Path, manifest: Manifest) -> MemorySpec:
    """The kb's MemorySpec with the state its scheme needs: a vq kb's codebooks, read and checked
    (one M3Error naming the codebooks file if it is missing or damaged)."""
    spec = manifest.spec
    if "vq" in manifest.quant:
        from m3compile import codebooks

        spec = spec.with_codebooks(codebooks.read(kb_dir, manifest.quant["vq"]), manifest.quant["vq"]["sha256"])
    return spec


def load_kb_model(kb: KnowledgeBase, model: str | Path | None = None, device: str = "cpu", dtype: str = "float32"):
    """The checkpoint a kb was compiled with: `model`, else the path its manifest records, on
    `device`, computing in `dtype` ("float32", or "bfloat16": pass kb.spec.dtype to reproduce a bf16
    kb's memories with memorize).

    Refuses a checkpoint whose config, weights or tokenizer differ from the manifest's
    fingerprint: memories are tied to one exact checkpoint (paper Remark 9).
    """
    from m3compile.config import default_model_dir
    from m3compile.checkpoint import fingerprint
    from m3compile.model import load_checkpoint

    recorded = kb.manifest.model
    embedded = model is None and recorded["path"] == "<embedded example>"
    if model is None:
        if embedded:
            model = default_model_dir()
        else:
            # recorded relative to the kb directory (older kbs: as given, relative to where they were compiled)
            model = next((p for p in (kb.path / recorded["path"], Path(recorded["path"])) if p.is_dir()), None)
        if model is None or not Path(model).is_dir():
            raise M3Error(f"the kb's model {recorded['path']!r} is not found from here; pass --model "
                          "with the checkpoint the kb was compiled with")
    fp = fingerprint(model)
    for key, what in (("config_sha256", "the config.json differs"),
                      ("tokenizer_sha256", "the tokenizer.json differs"), ("weights_sha256", "the weights differ")):
        if fp[key] != recorded[key]:
            if embedded:
                # the embedded default changed between versions (0.2.0: the sparse reader)
                raise M3Error(f"{kb.path} was compiled with an earlier embedded model than this "
                              f"m3compile's ({what}); recompile it (m3 compile CORPUS -o {kb.path} "
                              "--rebuild), or pass --model with that model (before 0.2.0: the 1/2 reader, "
                              "examples/reader-half/model in the source repository; an earlier 0.2.0 "
                              "development default: examples/reader/model in its git history)")
            raise M3Error(f"model {model} differs from the one {kb.path} was compiled with ({what}); "
                          "pass the same --model, or recompile the kb with this one")
    return load_checkpoint(model, device=device, dtype=dtype)


def open_kb(path: str | Path) -> KnowledgeBase:
    """Open a knowledge base directory written by `m3 compile`.

    Args:
        path: the kb directory (holds manifest.json).
    Returns:
        KnowledgeBase with `.manifest` (a Manifest), `.spec` (its MemorySpec), `.references()`
        (pyarrow Table), `.memory(ref_id)`, `.memories(ref_ids)` and `.retrieve(text, k)`.
    Example:
        >>> kb = open_kb("kb/")
        >>> kb.manifest.counts["references"], kb.memory(0).keys.shape
    """
    if not isinstance(path, (str, os.PathLike)):  # open_kb(123): a TypeError traceback from Path
        raise M3Error(f"open_kb({path!r}): {type(path).__name__} is not a path; give the kb directory "
                      "(str or os.PathLike)")
    return KnowledgeBase(Path(path))


def describe(kb: KnowledgeBase) -> dict:
    """What `m3 inspect` shows: read from the manifest, shard headers and the parquet footer only."""
    from m3compile.pack import read_shard_header

    m = kb.manifest
    shards = m.shards
    for name in shards:
        read_shard_header(kb.path / name)  # refuses a foreign or newer shard by name
    rows = refs_file.check_metadata(kb.references_path).num_rows
    if rows != m.counts["references"]:
        raise M3Error(f"{kb.path}: references.parquet has {rows} rows but the manifest says "
                      f"{m.counts['references']}; the kb is damaged: {REPAIR_HINT.format(kb=kb.path)}")
    on_disk = sum((kb.path / name).stat().st_size for name in m.files if (kb.path / name).is_file())
    sz, q, c, w, model = m.sizes, m.quant, m.counts, m.write, m.model
    return {
        "path": str(kb.path),
        "format": f"m3-kb v{m.format_version}",
        "created_by": m.created_by,
        "model": {"path": model["path"], "architecture": model["architecture"], "n_layers": model["n_layers"],
                  "n_heads": model["n_heads"], "n_kv_heads": model["n_kv_heads"], "head_dim": model["head_dim"],
                  "dtype": model["dtype"], "config_sha256": model["config_sha256"]},
        "write": {"prefix": w["prefix_text"], "prefix_ids": w["prefix_ids"], "memory_layers": w["memory_layers"],
                  "top_k": w["top_k"], "max_tokens": w["max_tokens"]},
        "counts": c,
        "dead": {"references": m.state["dead_refs"], "kv_bytes": m.state["dead_kv_bytes"],
                 "share": round(m.state["dead_kv_bytes"] / max(1, sum(s["kv_bytes"] for s in shards.values())), 4)},
        "generation": m.generation,
        "retrieval": {"mode": m.retrieval.get("mode"), "dense": bool(m.retrieval.get("dense"))},
        "quant": q,
        "sizes": {**sz, "on_disk_bytes": on_disk,
                  "vs_dense_bf16": round(sz["dense_bf16_bytes"] / max(1, on_disk), 2),
                  "vs_sparse_bf16": round(sz["sparse_bf16_bytes"] / max(1, sz["payload_bytes"]), 2),
                  "bytes_per_reference": round(sz["payload_bytes"] / max(1, c["references"]), 1)},
    }


def reference_detail(kb: KnowledgeBase, ref_id: int) -> dict:
    """One reference: its row, and per memory layer and kv head the kept tokens (j, id, text)."""
    rows = kb.reference_rows([ref_id]) if 0 <= ref_id < 2**63 else []  # ref ids are int64
    if not rows:
        raise M3Error(f"no reference {ref_id} in {kb.path} ({kb.ids_hint()}); see `m3 inspect`")
    row = rows[0]
    positions = kb.kept_positions(ref_id)  # (L, H, K)
    tok = None
    tok_path = kb.path / kb.manifest.paths["tokenizer"]
    if tok_path.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        with damaged_file(tok_path, kb.path):
            tok = HFTokenizer.from_file(str(tok_path))
    ids = row["token_ids"]
    kept = {}
    for li, layer in enumerate(kb.layers):
        kept[layer] = [[{"j": int(j), "id": ids[j], "text": tok.id_to_token(ids[j]) if tok else None}
                        for j in positions[li, h].tolist()] for h in range(positions.shape[1])]
    return {**{k: v for k, v in row.items() if k != "token_ids"}, "kept": kept}
