"""compile_kb: the only module that knows the stage order (STYLE rule 1).

corpus -> chunk -> plan -> encode -> sparsify -> quantize+pack -> shards -> generation -> manifest.

A compile into an existing kb is incremental (formats/manifest.md, "Incremental compiles"): every
reference has a content key (store.py); references whose key the kb already holds keep their id
and their frame; only new ones are encoded, into new shards appended after the existing ones;
references that left are tombstoned. Frames already on disk (including those of a compile that
was killed) are copied, never encoded again. The mutable artefacts go into a content-addressed
generation directory, and the manifest, written last and atomically, commits it all; files it
does not name are removed after the commit. Encoding pads every batch to the same width, so a
resumed or incremental compile writes the bytes a full one would.
"""

import hashlib
import os
import platform
import signal
import socket
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from m3compile import __version__, manifest as mf, references as refs_file, store
from m3compile.chunk import CHUNK_RULE_VERSION, Reference, chunk_documents
from m3compile.config import (MEMORY_SETTINGS, MODEL_MEMORY_FILE, READ_SETTINGS, RUN_SETTINGS, CompileConfig,
                              default_model_dir, describe_settings, read_model_memory)
from m3compile.corpus import RECORD_SUFFIXES, TEXT_SUFFIXES, CorpusReport, iter_documents
from m3compile.encode import encode_batch, write_prefix
from m3compile.errors import M3Error
from m3compile.index import build_indexes, index_texts
from m3compile.model import Checkpoint, fingerprint, load_checkpoint
from m3compile.pack import (CODEC, FORMAT, FORMAT_VERSION, INDEX_NAME, LAYOUT, ZSTD_LEVEL, ShardWriter,
                            bits_per_element, encode_payload, frame_shape, payload_nbytes, read_frame,
                            shard_info, write_shard_index)
from m3compile.quantize import get_scheme
from m3compile.sparsify import select_topk

Progress = Callable[[dict], None]  # receives {"event": "start"|"batch"|"done", ...}
TOKENIZER_COPY = "tokenizer.json"  # the model's tokenizer, so a kb is readable without its model


class Timer:
    """Wall seconds per stage, accumulated across batches."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - t0


def crash_point(name: str) -> None:
    """Test hook: M3_CRASH_AT=<name> kills this process here with SIGKILL (tests/test_incremental.py)."""
    if os.environ.get("M3_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def corpus_bytes(root: Path) -> int:
    """Size of the corpus files on disk: the denominator of the progress estimate."""
    if root.is_file():
        return root.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES and p.is_file():
                total += p.stat().st_size
    return total


def resolve_model(config: CompileConfig, log: Callable[[str], None]) -> Path:
    if config.model is not None:
        return Path(config.model)
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise M3Error("no --model given and the embedded example model is not in this installation "
                      f"({path}); pass --model path/to/hf-checkpoint")
    log(f"no --model given: using the embedded example model {path}")
    return path


@dataclass
class Setup:
    """What a compile derives from its config and model before reading the corpus."""

    config: CompileConfig
    ck: Checkpoint
    model_path: Path
    model_id: dict
    layers: tuple[int, ...]
    prefix_ids: list[int]
    scheme: object
    context: bytes  # shared part of every content key

    @property
    def max_payload(self) -> int:
        a = self.ck.args
        return payload_nbytes(self.scheme, len(self.layers), a.n_kv_heads, self.config.top_k, a.head_dim)


def _setup(config: CompileConfig, log) -> tuple[Setup, Timer]:
    timer = Timer()
    model_path = resolve_model(config, log)
    with timer("load_model"):
        ck = load_checkpoint(model_path, device=config.device, dtype=config.dtype)
        model_id = fingerprint(model_path)
    layers = config.resolve_layers(ck.args.n_layers)
    _note_model_memory(config, model_path, layers, log)
    prefix_ids = write_prefix(ck.tokenizer, config.prefix)
    scheme = get_scheme(config.quant, ck.model.dtype, head_dim=ck.args.head_dim)
    context = store.key_context(model_id, prefix_ids, config.top_k, layers, scheme.name, config.dtype, config.max_tokens)
    return Setup(config, ck, model_path, model_id, layers, prefix_ids, scheme, context), timer


def _note_model_memory(config: CompileConfig, model_path: Path, layers: tuple[int, ...], log) -> None:
    """Say so when a memory-trained model compiles memories unlike those it learned to read."""
    trained = read_model_memory(model_path)
    if trained is None:
        return
    now = {**{k: getattr(config, k) for k in READ_SETTINGS}, "memory_layers": layers}
    differ = [k for k in READ_SETTINGS if k in trained and trained[k] is not None and trained[k] != now[k]]
    if differ:
        log(f"note: {model_path} was trained to read memories compiled with "
            f"{describe_settings({k: trained[k] for k in differ})} ({MODEL_MEMORY_FILE}); this kb uses "
            f"{describe_settings({k: now[k] for k in differ})}, which it may read poorly")


# ---- the previous kb ------------------------------------------------------------------------------

@dataclass
class Previous:
    manifest: dict | None = None
    rows: list[dict] = field(default_factory=list)  # live references
    next_ref_id: int = 0
    next_shard: int = 1


def _identity(setup: Setup) -> dict:
    """What must match for a kb's memories to be reused: model, tokenizer, prefix, memory settings."""
    c = setup.config.to_dict()
    return {"model config.json": setup.model_id["config_sha256"], "model weights": setup.model_id["weights_sha256"],
            "tokenizer": setup.model_id["tokenizer_sha256"], "prefix ids": setup.prefix_ids,
            "memory layers": list(setup.layers), "chunk rule": CHUNK_RULE_VERSION,
            **{f"--{k.replace('_', '-')}": c[k] for k in MEMORY_SETTINGS if k != "memory_layers"}}


def _previous(out: Path, setup: Setup, rebuild: bool) -> Previous:
    if not (out / mf.FILE_NAME).exists():
        return Previous()
    try:
        manifest = mf.read_manifest(out)
        rows = refs_file.read_references(out / manifest["paths"]["references"]).to_pylist()
    except (M3Error, KeyError) as e:
        if rebuild:
            return Previous()
        raise M3Error(f"the existing kb in {out} cannot be read ({e}); pass --rebuild to compile it anew") from None
    shards = manifest["state"]["shards"]
    prev = Previous(manifest, rows, manifest["state"]["next_ref_id"],
                    1 + max((store.shard_number(s) for s in shards), default=0))
    if rebuild:
        # start over: no reference keeps its id, but frames on disk are still found by key
        return Previous(manifest, [], 0, prev.next_shard)
    old = manifest["identity"]
    for name, value in _identity(setup).items():
        if old.get(name) != value:
            raise M3Error(f"{out} was compiled with a different {name} ({_short(old.get(name))} vs "
                          f"{_short(value)} now); its memories cannot be mixed with these: pass --rebuild "
                          "to compile the kb anew (it stays readable until the new one is committed)")
    missing = sorted(s for s in shards if not (out / s).is_file())
    if missing:
        raise M3Error(f"shard {missing[0]} named by {out}/manifest.json is missing; run `m3 verify {out}` "
                      "to see the damage, or pass --rebuild")
    return prev


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---- planning -------------------------------------------------------------------------------------

@dataclass
class Plan:
    rows: list[dict]  # the live references after this compile (reused rows complete, new ones without location)
    new: list[tuple[dict, Reference]]  # rows to fill by encoding or copying, in ref id order
    removed: list[dict]  # live rows that leave (tombstoned)
    docs: dict[str, int]  # added / changed / removed / unchanged / kept
    report: CorpusReport


def _plan(setup: Setup, prev: Previous, keep_missing: bool, timer: Timer) -> Plan:
    config = setup.config
    report = CorpusReport()
    doc_sha: dict[str, str] = {}

    def hashed(docs):
        for d in docs:
            doc_sha[d.doc_id] = hashlib.sha256(d.text.encode("utf-8")).hexdigest()
            yield d

    docs = hashed(iter_documents(Path(config.corpus), report, follow_symlinks=config.follow_symlinks))
    old_by_key: dict[str, deque] = defaultdict(deque)
    for row in prev.rows:
        old_by_key[row["ref_key"]].append(row)
    rows, new, next_id = [], [], prev.next_ref_id
    with timer("read+chunk"):
        for ref in chunk_documents(docs, setup.ck.tokenizer, config.max_tokens, config.boundary, config.min_fill):
            key = store.ref_key(setup.context, ref.token_ids).hex()
            meta = {"doc_id": ref.doc_id, "source": ref.source, "index": ref.index, "char_start": ref.char_start,
                    "char_end": ref.char_end, "n_tokens": len(ref.token_ids), "token_ids": list(ref.token_ids),
                    "text": ref.text, "ref_key": key, "doc_sha256": doc_sha[ref.doc_id]}
            same = old_by_key.get(key)
            if same:
                # the kb already holds this memory: keep its id and its frame
                old = same.popleft()
                rows.append({**old, **meta})
            else:
                row = {"ref_id": next_id, **meta}
                next_id += 1
                rows.append(row)
                new.append((row, ref))
    report.raise_if_empty()
    if not rows:
        raise M3Error(f"corpus {config.corpus} has documents but no tokens to compile; check the texts")
    leftover = [r for q in old_by_key.values() for r in q]
    old_docs = {r["doc_id"]: r["doc_sha256"] for r in prev.rows}
    kept = [r for r in leftover if keep_missing and r["doc_id"] not in doc_sha]
    removed = [r for r in leftover if not (keep_missing and r["doc_id"] not in doc_sha)]
    rows += kept
    rows.sort(key=lambda r: r["ref_id"])
    docs = {"added": sum(d not in old_docs for d in doc_sha),
            "changed": sum(d in old_docs and old_docs[d] != s for d, s in doc_sha.items()),
            "unchanged": sum(old_docs.get(d) == s for d, s in doc_sha.items()),
            "removed": 0 if keep_missing else sum(d not in doc_sha for d in old_docs),
            "kept": sum(d not in doc_sha for d in old_docs) if keep_missing else 0}
    return Plan(rows, new, removed, docs, report)


# ---- writing --------------------------------------------------------------------------------------

class FrameSource:
    """Frames already on disk, by content key; follows an orphan shard moved aside before reuse of its name."""

    def __init__(self, out: Path):
        self.out = out
        self.frames = store.scan_frames(out)
        self.alias: dict[str, str] = {}

    def get(self, key: bytes):
        return self.frames.get(key)

    def read(self, frame: store.Frame) -> bytes:
        return read_frame(self.out / self.alias.get(frame.shard, frame.shard), frame.offset, frame.length)

    def move_aside(self, name: str) -> None:
        # an orphan shard (named by no manifest) whose name a new shard takes: keep its frames reachable
        aside = f".orphan-{name}"
        os.replace(self.out / name, self.out / aside)
        self.alias[name] = aside


def _shard_metadata(setup: Setup) -> dict:
    return {"quant": setup.scheme.name, "model_config_sha256": setup.model_id["config_sha256"],
            "created_by": f"m3compile {__version__}"}


def _write_new(out: Path, setup: Setup, prev: Previous, plan: Plan, timer: Timer, progress: Progress) -> dict:
    config, ck = setup.config, setup.ck
    source = FrameSource(out)
    stats = {"encoded": 0, "copied": 0}
    with ShardWriter(out, _shard_metadata(setup), config.max_shard_bytes, first_index=prev.next_shard) as writer:
        writer.before_replace = source.move_aside
        for start in range(0, len(plan.new), config.batch_size):
            batch = plan.new[start:start + config.batch_size]
            todo = [(row, ref) for row, ref in batch if source.get(bytes.fromhex(row["ref_key"])) is None]
            fresh = {}
            if todo:
                with timer("encode"):
                    encoded = encode_batch(ck.model, [r.token_ids for _, r in todo], setup.prefix_ids, setup.layers,
                                           pad_to=config.max_tokens)
                with timer("sparsify"):
                    memories = select_topk(encoded, config.top_k)
                with timer("quantize+compress"):
                    for (row, _), mem in zip(todo, memories):
                        frame, err = encode_payload(mem.keys, mem.values, mem.positions, setup.scheme)
                        # float32, as the table and the shard store them, so reuse changes no figure
                        rel, mx = float(np.float32(err.rel)), float(np.float32(err.max_abs))
                        fresh[row["ref_id"]] = (frame, rel, mx, mem.positions.shape[-1])
                crash_point(f"encode:{start // config.batch_size + 1}")
            with timer("write"):
                for row, _ in batch:
                    if row["ref_id"] in fresh:
                        frame, rel, mx, K = fresh[row["ref_id"]]
                        stats["encoded"] += 1
                    else:
                        f = source.get(bytes.fromhex(row["ref_key"]))
                        frame, rel, mx = source.read(f), f.rel_err, f.max_err
                        K = frame_shape(frame, setup.max_payload)[2]
                        stats["copied"] += 1
                    n_shards = len(writer.shards)
                    loc = writer.add(row["ref_id"], frame, bytes.fromhex(row["ref_key"]), (rel, mx))
                    if len(writer.shards) > n_shards:
                        crash_point("shard")
                    row.update(n_kept=K, shard=loc.shard, byte_offset=loc.byte_offset, byte_length=loc.byte_length,
                               quant_rel_err=rel, quant_max_err=mx)
            progress({"event": "batch", "refs": len(batch), "tokens": sum(len(r.token_ids) for _, r in batch),
                      "bytes": sum(len(r.text.encode("utf-8")) for _, r in batch)})
        with timer("write"):
            writer.close()
    stats["shards_written"] = writer.written
    stats["shards_kept"] = writer.kept
    return stats


def _build_generation(out: Path, setup: Setup, rows: list[dict], shards: list[str], timer: Timer) -> tuple[str, dict]:
    retrieval = {}

    def build(gen: Path):
        refs_file.write_references(gen / refs_file.FILE_NAME, rows)
        infos = [shard_info(out / s) for s in shards]
        meta = {**_shard_metadata(setup), "format": FORMAT, "format_version": str(FORMAT_VERSION), "codec": CODEC,
                "zstd_level": str(ZSTD_LEVEL), "layout": LAYOUT, "rope": "post", "shard_dir": ".."}
        write_shard_index(gen, infos, meta)
        (gen / TOKENIZER_COPY).write_bytes((setup.ck.path / "tokenizer.json").read_bytes())
        with timer("index"):
            texts = index_texts([r["doc_id"] for r in rows], [r["index"] for r in rows], [r["text"] for r in rows])
            retrieval.update(build_indexes(gen, [r["ref_id"] for r in rows], texts,
                                           setup.config.embedder, setup.config.index_factory,
                                           setup.config.device)["retrieval"])

    with timer("write"):
        gen = store.write_generation(out, build)
    return gen, retrieval


def _build_manifest(setup: Setup, rows: list[dict], gen: str, retrieval: dict, shards: dict, plan_docs: int,
                    report: CorpusReport, out: Path, next_ref_id: int) -> dict:
    config, a = setup.config, setup.ck.args
    L, H, D = len(setup.layers), a.n_kv_heads, a.head_dim
    kept_kv = sum(L * H * r["n_kept"] for r in rows)
    raw = sum(payload_nbytes(setup.scheme, L, H, r["n_kept"], D) for r in rows)
    payload = sum(r["byte_length"] for r in rows)
    tokens = sum(r["n_tokens"] for r in rows)
    gen_files = sorted(p.relative_to(out).as_posix() for p in (out / gen).rglob("*") if p.is_file())
    files = {name: mf.file_entry(out, name) for name in sorted(shards) + gen_files}
    dead_refs = sum(s["refs"] - s["live_refs"] for s in shards.values())
    dead_bytes = sum(s["kv_bytes"] - s["live_kv_bytes"] for s in shards.values())
    rel = [r["quant_rel_err"] for r in rows]
    return {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "created_by": f"m3compile {__version__}",
        "config": {k: v for k, v in config.to_dict().items() if k not in RUN_SETTINGS},
        "memory_settings": list(MEMORY_SETTINGS),
        "identity": _identity(setup),
        "model": {"path": str(config.model) if config.model is not None else "<embedded example>",
                  **setup.model_id, "n_layers": a.n_layers, "n_kv_heads": H, "n_heads": a.n_heads, "head_dim": D,
                  "dtype": config.dtype},
        "write": {
            "prefix_text": config.prefix,
            "prefix_ids": setup.prefix_ids,
            "memory_layers": list(setup.layers),
            "top_k": config.top_k,
            "max_tokens": config.max_tokens,
            "chunk_rule_version": CHUNK_RULE_VERSION,
            # reference token j was encoded at RoPE position len(prefix_ids) + j
            "position_offset": len(setup.prefix_ids),
            "rope": "post",
            "selection": "logsumexp over group query heads and reference queries of pre-RoPE q.k/sqrt(D), "
                         "no causal mask, prefix and padding excluded, ties to lower j",
        },
        "quant": {
            "scheme": setup.scheme.name,
            "bits_per_element_at_top_k": round(bits_per_element(setup.scheme, L, H, config.top_k, D), 4),
            "bits_per_element_stored": round(8 * raw / (2 * kept_kv * D), 4),
            "bits_per_element_compressed": round(8 * payload / (2 * kept_kv * D), 4),
            "rel_err_max": max(rel),
            "rel_err_mean": sum(rel) / len(rel),
            "max_abs_err": max(r["quant_max_err"] for r in rows),
        },
        "counts": {
            "documents": plan_docs,
            "references": len(rows),
            "tokens": tokens,
            "kept_kv": kept_kv,
            "shards": len(shards),
            "skipped": dict(sorted(report.skipped.items())),
        },
        "sizes": {
            "payload_bytes": payload,
            "payload_raw_bytes": raw,
            # the same references' key-values kept whole in bf16, in every layer: the paper's dense baseline
            "dense_bf16_bytes": tokens * a.n_layers * 2 * H * D * 2,
            "sparse_bf16_bytes": kept_kv * 2 * D * 2,
            "files_bytes": sum(e["bytes"] for e in files.values()),
        },
        "state": {"next_ref_id": next_ref_id, "shards": shards, "dead_refs": dead_refs, "dead_kv_bytes": dead_bytes},
        "generation": gen,
        "paths": {"references": f"{gen}/{refs_file.FILE_NAME}", "shard_index": f"{gen}/{INDEX_NAME}",
                  "tokenizer": f"{gen}/{TOKENIZER_COPY}"},
        "retrieval": retrieval,
        "files": files,
        "run_log": mf.RUN_LOG,
    }


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise M3Error(f"output {out} is a file; give a directory path for the knowledge base")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not store.is_kb_entry(p.name))
        if foreign:
            raise M3Error(f"output directory {out} holds files that are not part of a knowledge base "
                          f"({', '.join(foreign[:3])}); give a new or empty directory, or an existing kb")
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class CompileResult:
    manifest: dict
    summary: dict  # what this run did: documents added/changed/..., references encoded/copied/reused/removed


def compile_kb(config: CompileConfig, out_dir: str | Path, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None, keep_missing: bool = False,
               rebuild: bool = False) -> CompileResult:
    """Compile `config.corpus` into the knowledge base at `out_dir`, incrementally if one is there.

    Args:
        config: every compile setting (see CompileConfig).
        out_dir: a new or empty directory, or a kb compiled with the same model and memory settings.
        progress: called with {"event": "start", "total_bytes"}, {"event": "batch", "refs",
            "tokens", "bytes"} and {"event": "done"}.
        log: receives human-readable notes (which model, skipped files, what changed).
        keep_missing: keep the references of documents absent from this corpus (add-only).
        rebuild: compile anew even if the kb was made with other settings.
    Returns:
        CompileResult with the manifest (also written to out_dir/manifest.json) and a summary.
    Example:
        >>> compile_kb(CompileConfig(corpus="examples/corpus"), "kb/").manifest["counts"]["references"]
    """
    progress = progress or (lambda e: None)
    out = Path(out_dir)
    corpus = Path(config.corpus)
    if not corpus.exists():
        raise M3Error(f"corpus {corpus} does not exist; pass an existing directory or file")
    _prepare_out_dir(out)
    t_start = time.time()
    with store.KbLock(out, log):
        store.remove_temporaries(out)
        setup, timer = _setup(config, log)
        prev = _previous(out, setup, rebuild)
        progress({"event": "start", "total_bytes": corpus_bytes(corpus)})
        plan = _plan(setup, prev, keep_missing, timer)
        if _unchanged(setup, prev, plan):
            # nothing would change: no shard, generation or manifest is written (CI rebuilds)
            for line in plan.report.summary_lines()[1:]:
                log(line)
            progress({"event": "done"})
            return CompileResult(prev.manifest, {"documents": plan.docs, "references": {
                "encoded": 0, "copied": 0, "reused": len(plan.rows), "removed": 0}, "shards_written": [],
                "shards_kept": sorted(prev.manifest["state"]["shards"])})
        try:
            stats = _write_new(out, setup, prev, plan, timer, progress)
        except OSError as e:
            raise M3Error(f"cannot write to {out}: {e.strerror or e}; free space or fix permissions and run "
                          "the same command again: finished shards are kept") from None
        shards = store.shard_state(out, plan.rows)
        gen, retrieval = _build_generation(out, setup, plan.rows, sorted(shards), timer)
        crash_point("generation")
        next_id = max([prev.next_ref_id] + [r["ref_id"] + 1 for r in plan.rows])
        manifest = _build_manifest(setup, plan.rows, gen, retrieval, shards, len({r["doc_id"] for r in plan.rows}),
                                   plan.report, out, next_id)
        summary = {"documents": plan.docs, "references": {"encoded": stats["encoded"], "copied": stats["copied"],
                                                          "reused": len(plan.rows) - len(plan.new),
                                                          "removed": len(plan.removed)},
                   "shards_written": stats["shards_written"], "shards_kept": stats["shards_kept"]}
        run = {"created_at_unix": round(t_start, 3), "wall_seconds": round(time.time() - t_start, 3),
               "stage_seconds": {k: round(v, 4) for k, v in sorted(timer.seconds.items())},
               "summary": summary, "host": socket.gethostname(), "python": platform.python_version(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               **{k: v for k, v in config.to_dict().items() if k in RUN_SETTINGS}}
        mf.atomic_write_text(out / mf.RUN_LOG, mf.to_json(run))
        old_bytes = (out / mf.FILE_NAME).read_bytes() if (out / mf.FILE_NAME).exists() else None
        if mf.to_json(manifest).encode() != old_bytes:
            mf.write_manifest(out, manifest, before_replace=lambda: crash_point("commit"))
        store.collect_garbage(out, set(shards) | {gen})
    for line in plan.report.summary_lines()[1:]:
        log(line)
    progress({"event": "done"})
    return CompileResult(manifest, summary)


def _unchanged(setup: Setup, prev: Previous, plan: Plan) -> bool:
    if prev.manifest is None or plan.new or plan.removed or plan.rows != prev.rows:
        return False
    config = {k: v for k, v in setup.config.to_dict().items() if k not in RUN_SETTINGS}
    return config == prev.manifest["config"] and prev.manifest["created_by"] == f"m3compile {__version__}"


def check_kb(config: CompileConfig, out_dir: str | Path, keep_missing: bool = False) -> list[str]:
    """What a compile of `config` into `out_dir` would change; [] when the kb is up to date. Writes nothing."""
    out = Path(out_dir)
    if not (out / mf.FILE_NAME).exists():
        return [f"{out} holds no knowledge base: everything would be compiled"]
    setup, timer = _setup(config, lambda s: None)
    try:
        prev = _previous(out, setup, rebuild=False)
    except M3Error as e:
        return [str(e)]
    plan = _plan(setup, prev, keep_missing, timer)
    changes = []
    old_config = prev.manifest["config"]
    new_config = {k: v for k, v in setup.config.to_dict().items() if k not in RUN_SETTINGS}
    for k in sorted(set(old_config) | set(new_config)):
        if old_config.get(k) != new_config.get(k):
            changes.append(f"setting {k}: {old_config.get(k)!r} -> {new_config.get(k)!r}")
    for what, n in plan.docs.items():
        if n and what in ("added", "changed", "removed"):
            changes.append(f"documents {what}: {n}")
    if plan.new:
        changes.append(f"references to add: {len(plan.new)}")
    if plan.removed:
        changes.append(f"references to remove: {len(plan.removed)}")
    if not changes and plan.rows != prev.rows:
        changes.append("reference metadata changed (positions in documents, sources or texts)")
    return changes
