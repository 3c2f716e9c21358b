"""manifest.json: the entry point and commit point of a knowledge base (formats/manifest.md).

This module owns its schema: `Manifest` is the typed document, `read_manifest` its one reader
(which checks the format and version first), `build_manifest` the one place its sections are
computed, and `commit` the one commit path of compile, compact and repair. The manifest is written
last and atomically (temp file, fsync, rename, fsync of the directory), so a directory without a
manifest is by definition incomplete; then every top-level entry it does not name is removed. Its
content is deterministic: JSON with sorted keys, no timestamps or timings; those go to run.json
beside it, which no checksum covers.
"""

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np

from m3compile import __version__
from m3compile.errors import M3Error
from m3compile.pack import bits_per_element, payload_nbytes
from m3compile.references import iter_columns
from m3compile.spec import MemorySpec
from m3compile.store import file_stamp, sha256_file

FORMAT, FORMAT_VERSION = "m3-kb", 1
FILE_NAME = "manifest.json"
RUN_LOG = "run.json"
REFERENCES, SHARD_INDEX, TOKENIZER = "references.parquet", "memory.safetensors.index.json", "tokenizer.json"
SELECTION_RULE = ("logsumexp over group query heads and reference queries of pre-RoPE q.k/sqrt(D), "
                  "no causal mask, prefix and padding excluded, ties to lower j")
# bf16 models compute q.k in bf16 (sparsify.token_scores); float32 manifests keep the text above
SELECTION_RULE_BF16 = SELECTION_RULE + "; q.k a bf16 matmul rounded to bf16, the rest float32"


@dataclass(frozen=True)
class Manifest:
    """The manifest document; each field is one top-level key (formats/manifest.md)."""

    format_version: int  # 1
    created_by: str  # "m3compile <version>"
    config: dict  # the CompileConfig as run, less run settings; paths relative to the kb directory
    memory_settings: list  # config keys that change a memory's bytes
    identity: dict  # MemorySpec.identity(): what a compile into this kb must match
    model: dict  # path (relative to the kb), architecture, args, dims, dtype, sha256s
    write: dict  # prefix, position offset, memory layers, top-k, width, rope, selection rule
    quant: dict  # scheme, bits per element, quantization errors
    counts: dict  # documents, references, tokens, kept_kv, shards, skipped
    sizes: dict  # payload, raw, dense/sparse bf16 baselines, files bytes
    state: dict  # next_ref_id, shards (name -> refs, live_refs, kv_bytes, live_kv_bytes), dead counts
    generation: str  # gen-<16 hex>
    paths: dict  # references, shard_index, tokenizer: relative to the kb directory
    retrieval: dict  # formats/index.md
    files: dict  # relative path -> {"bytes", "sha256"}
    run_log: str = RUN_LOG
    unknown: dict = field(default_factory=dict)  # keys of a later minor writer, kept as they are

    @cached_property
    def spec(self) -> MemorySpec:
        """The write recipe of this kb's memories."""
        return MemorySpec.from_manifest(self.to_dict())

    @property
    def artefacts(self) -> list[str]:
        """Top-level files besides shards and the generation: the VQ codebooks, if any."""
        return [self.quant["vq"]["path"]] if "vq" in self.quant else []

    @property
    def shards(self) -> dict:
        """Live shard name -> {"refs", "live_refs", "kv_bytes", "live_kv_bytes"}."""
        return self.state["shards"]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "unknown"}
        return {"format": FORMAT, **self.unknown, **d}

    def to_json(self) -> str:
        return to_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, where: str = FILE_NAME) -> "Manifest":
        names = {f.name for f in fields(cls)} - {"unknown"}
        missing = sorted(n for n in names if n not in d and n != "run_log")
        if missing:
            raise M3Error(f"{where} lacks {', '.join(missing)}; the manifest is damaged: run `m3 compile` with "
                          "--rebuild into the kb")
        return cls(**{k: d[k] for k in names if k in d},
                   unknown={k: v for k, v in d.items() if k not in names and k != "format"})

    def with_generation(self, kb_dir: Path, generation: str, shards: dict, checked: dict | None = None) -> "Manifest":
        """This manifest naming a new generation and shard state: files, paths, state and the
        counts and sizes that follow from them are recomputed (compile and compact both end here).
        `checked`: files hashed earlier in this run and unchanged since (file_entry)."""
        gen_files = sorted(p.relative_to(kb_dir).as_posix() for p in (Path(kb_dir) / generation).rglob("*")
                           if p.is_file())
        files = {name: file_entry(kb_dir, name, checked) for name in sorted(shards) + self.artefacts + gen_files}
        state = {**self.state, "shards": shards,
                 "dead_refs": sum(s["refs"] - s["live_refs"] for s in shards.values()),
                 "dead_kv_bytes": sum(s["kv_bytes"] - s["live_kv_bytes"] for s in shards.values())}
        return replace(self, generation=generation, files=files, state=state,
                       paths={"references": f"{generation}/{REFERENCES}", "shard_index": f"{generation}/{SHARD_INDEX}",
                              "tokenizer": f"{generation}/{TOKENIZER}"},
                       counts={**self.counts, "shards": len(shards)},
                       sizes={**self.sizes, "files_bytes": sum(e["bytes"] for e in files.values())})


def build_manifest(kb_dir: Path, spec: MemorySpec, config: dict, model: dict, rows: list[dict], generation: str,
                   retrieval: dict, shards: dict, skipped: dict, next_ref_id: int, vq: dict | None = None,
                   checked: dict | None = None, state: dict | None = None) -> Manifest:
    """The manifest of a compile: its spec, config record and model record, and the live rows
    (`vq`: the codebooks entry of a vector-quantized kb, m3compile/codebooks.py; `checked`: files
    this compile hashed before, store.damaged_files; `state`: more keys of the manifest's state)."""
    L, H, D = len(spec.memory_layers), spec.n_kv_heads, spec.head_dim
    # one pass over the rows a block at a time, numbers summed as int64 arrays and floats one at a
    # time in row order: nothing held per row (issue 16)
    kept_counts: dict[int, int] = defaultdict(int)
    payload = tokens = n_rows = 0
    rel_max, max_err, docs = -np.inf, -np.inf, set()

    def rel_errs():
        nonlocal payload, tokens, n_rows, rel_max, max_err
        for cols in iter_columns(rows, ("n_kept", "byte_length", "n_tokens", "quant_rel_err", "quant_max_err",
                                        "doc_id")):
            for k, n in zip(*np.unique(np.asarray(cols["n_kept"], dtype=np.int64), return_counts=True)):
                kept_counts[int(k)] += int(n)
            payload += int(np.sum(np.asarray(cols["byte_length"], dtype=np.int64)))
            tokens += int(np.sum(np.asarray(cols["n_tokens"], dtype=np.int64)))
            n_rows += len(cols["doc_id"])
            rel_max = max(rel_max, float(np.max(cols["quant_rel_err"])))
            max_err = max(max_err, float(np.max(cols["quant_max_err"])))
            docs.update(cols["doc_id"])
            yield from map(float, cols["quant_rel_err"])

    rel_sum = sum(rel_errs())  # one sum over one iterator: the float the whole column gave
    kept_kv = L * H * sum(k * n for k, n in kept_counts.items())
    raw = sum(payload_nbytes(spec.scheme, L, H, k, D) * n for k, n in sorted(kept_counts.items()))
    from m3compile.config import MEMORY_SETTINGS

    base = Manifest(
        format_version=FORMAT_VERSION, created_by=f"m3compile {__version__}", config=config,
        memory_settings=list(MEMORY_SETTINGS), identity=spec.identity(), model=model,
        write={"prefix_text": spec.prefix, "prefix_ids": list(spec.prefix_ids),
               "memory_layers": list(spec.memory_layers), "top_k": spec.top_k, "max_tokens": spec.width,
               "chunk_rule_version": spec.chunk_rule_version,
               # reference token j was encoded at RoPE position len(prefix_ids) + j
               "position_offset": spec.position_offset, "rope": "post",
               "selection": SELECTION_RULE_BF16 if spec.dtype == "bfloat16" else SELECTION_RULE},
        quant={"scheme": spec.quant,
               "bits_per_element_at_top_k": round(bits_per_element(spec.scheme, L, H, spec.top_k, D), 4),
               "bits_per_element_stored": round(8 * raw / (2 * kept_kv * D), 4),
               "bits_per_element_compressed": round(8 * payload / (2 * kept_kv * D), 4),
               "rel_err_max": rel_max, "rel_err_mean": rel_sum / n_rows, "max_abs_err": max_err,
               # codes, positions, headers and zstd, plus the codebooks amortised over this kb
               **({"vq": vq, "bits_per_element_with_codebooks":
                   round(8 * (payload + vq["codebook_bytes"]) / (2 * kept_kv * D), 4)} if vq else {})},
        counts={"documents": len(docs), "references": n_rows, "tokens": tokens,
                "kept_kv": kept_kv, "shards": len(shards), "skipped": dict(sorted(skipped.items()))},
        sizes={"payload_bytes": payload, "payload_raw_bytes": raw,
               # the same references' key-values kept whole in bf16, in every layer: the paper's dense baseline
               "dense_bf16_bytes": tokens * spec.n_layers * 2 * H * D * 2,
               "sparse_bf16_bytes": kept_kv * 2 * D * 2},
        state={"next_ref_id": next_ref_id, **(state or {})}, generation="", paths={}, retrieval=retrieval, files={})
    return base.with_generation(kb_dir, generation, shards, checked)


def file_entry(kb_dir: Path, name: str, checked: dict | None = None) -> dict:
    """{"bytes", "sha256"} of a kb file; the sha256 of `checked` (store.damaged_files) where the file
    is unchanged since it was hashed there (an incremental compile's kept shards: hashed once)."""
    p = Path(kb_dir) / name
    st = p.stat()
    known = (checked or {}).get(name)
    if known is not None and known[0] == file_stamp(st):
        return {"bytes": st.st_size, "sha256": known[1]}
    sha = sha256_file(p)
    if known is not None and sha != known[1]:
        # a file this compile found whole and never writes (a kept shard) has other bytes now: taking
        # them as the kb's would make damage, or another process's writes, pass `m3 verify`
        raise M3Error(f"{p} changed while this compile ran (another process wrote it, or the disk); nothing "
                      "was committed: run the same command again, which checks it and rebuilds it if damaged")
    return {"bytes": st.st_size, "sha256": sha}


def atomic_write_text(path: Path, text: str, before_replace=None) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def to_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def commit(kb_dir: Path, manifest: Manifest, before_replace=None, collect: bool = True) -> list[str]:
    """Make `manifest` the kb's state: write it atomically (unless the file already holds exactly
    these bytes), then (collect) remove every top-level entry it does not name. Returns the removed
    names."""
    from m3compile.store import collect_garbage

    path = Path(kb_dir) / FILE_NAME
    text = manifest.to_json()
    if not path.is_file() or path.read_bytes() != text.encode():
        atomic_write_text(path, text, before_replace)
    if not collect:
        return []
    return collect_garbage(kb_dir, set(manifest.shards) | {manifest.generation} | set(manifest.artefacts))


def _check_structure(m: Manifest) -> None:
    """The nested keys that the commands read from every manifest (raises KeyError/TypeError)."""
    for name in ("config", "model", "write", "quant", "counts", "sizes", "state", "paths", "retrieval", "files"):
        if not isinstance(getattr(m, name), dict):
            raise TypeError(f"{name} is {type(getattr(m, name)).__name__}, not an object")
    for shard, entry in m.shards.items():
        if not isinstance(entry, dict) or any(type(entry[k]) is not int or entry[k] < 0
                                              for k in ("refs", "live_refs", "kv_bytes", "live_kv_bytes")):
            raise TypeError(f"state.shards[{shard!r}] is not a shard entry")
    for key in ("references", "shard_index", "tokenizer"):
        if not isinstance(m.paths[key], str):
            raise TypeError(f"paths.{key} is not a path")
    # the numbers `m3 inspect`, `m3 compact` and a compile's plan read (a KeyError or TypeError
    # traceback from those commands otherwise)
    for section, keys in (("counts", ("references", "shards", "documents", "tokens", "kept_kv")),
                          ("state", ("dead_refs", "dead_kv_bytes")),
                          ("sizes", ("payload_bytes", "dense_bf16_bytes", "sparse_bf16_bytes")),
                          ("config", ("max_shard_bytes",))):
        for key in keys:
            v = getattr(m, section)[key]
            if type(v) is not int or v < 0:
                raise TypeError(f"{section}.{key} = {v!r} is not a count")
    if not isinstance(m.counts["skipped"], dict):
        raise TypeError("counts.skipped is not an object")
    if not isinstance(m.model["architecture"], str) or not isinstance(m.model["path"], str):
        raise TypeError("model.architecture or model.path is not a string")
    if type(m.model["n_heads"]) is not int:
        raise TypeError(f"model.n_heads = {m.model['n_heads']!r}")
    for key in ("bits_per_element_stored", "bits_per_element_compressed", "rel_err_max", "rel_err_mean", "max_abs_err"):
        v = m.quant[key]  # printed by `m3 inspect`
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"quant.{key} = {v!r} is not a number")
    for name, entry in m.files.items():
        if not isinstance(entry, dict) or not isinstance(entry["sha256"], str):
            raise TypeError(f"files[{name!r}] has no sha256")
    # the numbers that size every frame read (the decompression bound among them): whole numbers
    # in range, so a damaged manifest is named here and not as a shard's fault or an out-of-memory
    spec = m.spec
    for what, v, hi in (("model.n_layers", spec.n_layers, 1 << 12), ("model.n_kv_heads", spec.n_kv_heads, 1 << 12),
                        ("model.head_dim", spec.head_dim, 1 << 14), ("write.max_tokens", spec.width, 1 << 20),
                        ("write.top_k", spec.top_k, spec.width if type(spec.width) is int else 0)):
        if type(v) is not int or not 1 <= v <= hi:
            raise ValueError(f"{what} = {v!r}")
    if not spec.memory_layers or any(type(i) is not int or not 0 <= i < spec.n_layers for i in spec.memory_layers):
        raise ValueError(f"write.memory_layers = {list(spec.memory_layers)!r}")
    if not isinstance(spec.quant, str) or not isinstance(spec.dtype, str):
        raise TypeError("quant.scheme or model.dtype is not a name")
    vq = m.quant.get("vq")
    if vq is not None or spec.quant.startswith("vq"):  # the codebooks' entry, read by open, verify, inspect, grow
        if not isinstance(vq, dict):
            raise TypeError("quant.vq is not an object")
        for key, kinds in (("path", str), ("sha256", str), ("factory", str), ("group", str), ("code_size", int),
                           ("codebook_bytes", int), ("train_rel_err_mean", (int, float))):
            if not isinstance(vq.get(key), kinds) or isinstance(vq.get(key), bool):
                raise TypeError(f"quant.vq.{key} is {vq.get(key)!r}")
    # what compiles and repairs take from `config` and `state` (a TypeError or an AssertionError deep in
    # a compile otherwise, or a kb written with a negative ref id)
    for key in ("corpus", "model", "embedder"):
        if m.config.get(key) is not None and not isinstance(m.config[key], str):
            raise TypeError(f"config.{key} = {m.config[key]!r} is not a path or name")
    nxt = m.state["next_ref_id"]
    if type(nxt) is not int or nxt < m.counts["references"]:
        raise ValueError(f"state.next_ref_id = {nxt!r}, not above every ref id of its {m.counts['references']} references")
    live = sum(e["live_refs"] for e in m.shards.values())
    dead = sum(e["refs"] - e["live_refs"] for e in m.shards.values())
    if live != m.counts["references"] or dead != m.state["dead_refs"] or any(
            e["live_refs"] > e["refs"] for e in m.shards.values()):
        raise ValueError(f"state.shards hold {live} live and {dead} dead references, counts.references "
                         f"{m.counts['references']} and state.dead_refs {m.state['dead_refs']}")
    # the write prefix the reading side builds positions from is the one the identity names
    ident = m.identity.get("prefix_ids") if isinstance(m.identity, dict) else None
    if ident is not None and list(spec.prefix_ids) != ident or not all(type(i) is int for i in spec.prefix_ids):
        raise ValueError(f"write.prefix_ids = {list(spec.prefix_ids)!r}, not identity.prefix_ids {ident!r}")
    # the retrieval section that `m3 query`, `m3 generate` and `m3 eval` open (retrieve.Retriever)
    from m3compile.retrieve import MODES  # numpy and the index module: no torch

    r = m.retrieval
    if type(r["format_version"]) is not int or r["mode"] not in MODES or type(r["count"]) is not int:
        raise ValueError(f"retrieval: format_version {r['format_version']!r}, mode {r['mode']!r}, count {r['count']!r}")
    docs = r.get("documents")
    indexes = [("retrieval.bm25", r["bm25"])] + ([("retrieval.documents.bm25", docs["bm25"])] if docs is not None else [])
    for what, entry in indexes:
        if not isinstance(entry, dict) or not isinstance(entry["dir"], str) or not isinstance(entry["tokenizer"], dict):
            raise TypeError(f"{what} is not an index entry (dir, tokenizer)")
    fusion = r.get("fusion")
    if fusion is not None or docs is not None:
        weights = fusion["weights"] if isinstance(fusion, dict) else None
        needed = ["bm25"] + (["bm25_doc"] if docs is not None else [])
        if not isinstance(weights, dict) or any(not isinstance(weights.get(k), (int, float))
                                                or isinstance(weights.get(k), bool) for k in needed) \
                or (fusion.get("depth") is not None and (type(fusion["depth"]) is not int or fusion["depth"] < 1)):
            raise ValueError(f"retrieval.fusion = {fusion!r} lacks the weights {needed} or a depth")
    # every path the manifest names stays inside the kb directory (the indexes' inside the generation)
    named = [*m.paths.values(), *m.files, *m.shards, m.generation, *m.artefacts,
             *(f"{m.generation}/{e['dir']}" for _, e in indexes)]
    for name in named:
        if not isinstance(name, str) or not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts \
                or "\\" in name:
            raise ValueError(f"the path {name!r} leaves the kb directory")


def read_manifest(kb_dir: Path) -> Manifest:
    """The kb's manifest, checked: format, a version this m3compile reads, every section present."""
    path = Path(kb_dir) / FILE_NAME
    if not Path(kb_dir).is_dir():
        raise M3Error(f"{kb_dir} is not a directory; give a knowledge base made by `m3 compile`")
    if not path.is_file():
        raise M3Error(f"no {FILE_NAME} in {kb_dir}: not a knowledge base, or its compile did not "
                      "finish; run `m3 compile` into it")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise M3Error(f"cannot parse {path}: {e}; the manifest is damaged: run `m3 compile` with --rebuild "
                      "into the kb") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise M3Error(f"{path} is not an m3compile kb manifest (format is not {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise M3Error(f"{path} has format_version {version!r}, which no m3compile writes (1 is the first); "
                      "the manifest is damaged: run `m3 compile` with --rebuild into the kb")
    if version > FORMAT_VERSION:
        raise M3Error(f"{path} has format_version {version}, newer than this m3compile reads "
                      f"({FORMAT_VERSION}); upgrade m3compile")
    try:
        manifest = Manifest.from_dict(doc, str(path))
        manifest.spec  # every field the memories need is there and typed
        _check_structure(manifest)  # what every command looks up, so a damaged one is this line, not a KeyError
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise M3Error(f"{path} lacks or mistypes a field ({e!r}); the manifest is damaged: run `m3 compile` "
                      "with --rebuild into the kb") from None
    return manifest
