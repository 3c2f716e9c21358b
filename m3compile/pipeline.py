"""compile_kb: the only module that knows the stage order (STYLE rule 1).

corpus -> chunk -> encode -> sparsify -> quantize+pack -> shards, references.parquet, manifest.
Documents and references stream; encode -> pack run in batches of `batch_size` references, so
peak memory is one batch plus one shard buffer. The manifest is written last: a directory
without one is an unfinished compile.
"""

import os
import platform
import shutil
import socket
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from m3compile import __version__, manifest as mf, references as refs_file
from m3compile.chunk import CHUNK_RULE_VERSION, Reference, chunk_documents
from m3compile.config import MEMORY_SETTINGS, CompileConfig, default_model_dir
from m3compile.corpus import RECORD_SUFFIXES, TEXT_SUFFIXES, CorpusReport, iter_documents
from m3compile.encode import encode_batch, write_prefix
from m3compile.errors import M3Error
from m3compile.index import BM25_DIR, FAISS_FILE, build_indexes
from m3compile.model import Checkpoint, fingerprint, load_checkpoint
from m3compile.pack import INDEX_NAME, ShardWriter, bits_per_element, encode_payload, payload_nbytes, write_shard_index
from m3compile.quantize import ZERO_ERROR, get_scheme
from m3compile.sparsify import select_topk

Progress = Callable[[dict], None]  # receives {"event": "start"|"batch"|"done", ...}


class Timer:
    """Wall seconds per stage, accumulated across batches."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - t0


def _timed_iter(it: Iterator, timer: Timer, stage: str) -> Iterator:
    # corpus reading and chunking are lazy: time them where the items are pulled
    while True:
        with timer(stage):
            item = next(it, None)
        if item is None:
            return
        yield item


def _batches(refs: Iterator[Reference], size: int) -> Iterator[list[Reference]]:
    batch = []
    for r in refs:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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


TOKENIZER_COPY = "tokenizer.json"  # the model's tokenizer, so a kb is readable without its model
KB_ARTEFACTS = (mf.FILE_NAME, mf.RUN_LOG, refs_file.FILE_NAME, INDEX_NAME, TOKENIZER_COPY, BM25_DIR, FAISS_FILE)


def _is_artefact(name: str) -> bool:
    return name in KB_ARTEFACTS or (name.startswith("memory-") and name.endswith(".safetensors")) \
        or (name.startswith(".") and name.endswith(".tmp"))


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def prepare_out_dir(out: Path) -> None:
    """Refuse a file or a foreign directory; clear what an unfinished compile left behind."""
    if out.exists() and not out.is_dir():
        raise M3Error(f"output {out} is a file; give a directory path for the knowledge base")
    if (out / mf.FILE_NAME).exists():
        raise M3Error(f"{out} already holds a knowledge base; remove it or choose another -o directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _is_artefact(p.name))
        if foreign:
            raise M3Error(f"output directory {out} is not empty ({', '.join(foreign[:3])}); "
                          "give a new or empty directory")
        for p in out.iterdir():  # leftovers of a compile that never wrote its manifest
            _remove(p)
    out.mkdir(parents=True, exist_ok=True)


def resolve_model(config: CompileConfig, log: Callable[[str], None]) -> Path:
    if config.model is not None:
        return Path(config.model)
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise M3Error("no --model given and the embedded example model is not in this installation "
                      f"({path}); pass --model path/to/hf-checkpoint")
    log(f"no --model given: using the embedded example model {path}")
    return path


def compile_kb(config: CompileConfig, out_dir: str | Path, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Compile `config.corpus` into a knowledge base at `out_dir`.

    Args:
        config: every compile setting (see CompileConfig).
        out_dir: a new or empty directory.
        progress: called with {"event": "start", "total_bytes"}, {"event": "batch", "refs",
            "tokens", "bytes"} and {"event": "done"}.
        log: receives human-readable notes (which model, skipped files).
    Returns:
        The manifest (also written to out_dir/manifest.json).
    Example:
        >>> compile_kb(CompileConfig(corpus="examples/corpus"), "kb/")["counts"]["references"]
    """
    progress = progress or (lambda e: None)
    out = Path(out_dir)
    corpus = Path(config.corpus)
    if not corpus.exists():
        raise M3Error(f"corpus {corpus} does not exist; pass an existing directory or file")
    model_path = resolve_model(config, log)
    timer = Timer()
    t_start = time.time()
    with timer("load_model"):
        ck = load_checkpoint(model_path, device=config.device, dtype=config.dtype)
        model_id = fingerprint(model_path)
    layers = config.resolve_layers(ck.args.n_layers)
    prefix_ids = write_prefix(ck.tokenizer, config.prefix)
    scheme = get_scheme(config.quant, ck.model.dtype, head_dim=ck.args.head_dim)
    prepare_out_dir(out)
    try:
        stats = _compile_into(out, config, ck, layers, prefix_ids, scheme, model_id, timer, progress)
    except BaseException:
        # nothing of an unfinished compile survives as if it were a kb: no manifest is written,
        # and the partial artefacts are removed
        for p in out.iterdir():
            if _is_artefact(p.name):
                _remove(p)
        raise
    report = stats.pop("report")
    for line in report.summary_lines()[1:]:
        log(line)
    manifest = _build_manifest(config, ck, model_path, model_id, layers, prefix_ids, scheme, stats, report, out)
    run = {"created_at_unix": round(t_start, 3), "wall_seconds": round(time.time() - t_start, 3),
           "stage_seconds": {k: round(v, 4) for k, v in sorted(timer.seconds.items())},
           "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
           "device": config.device, "threads": torch.get_num_threads()}
    mf.atomic_write_text(out / mf.RUN_LOG, mf.to_json(run))
    mf.write_manifest(out, manifest)
    progress({"event": "done"})
    return manifest


def _compile_into(out, config, ck: Checkpoint, layers, prefix_ids, scheme, model_id, timer, progress) -> dict:
    report = CorpusReport()
    docs = iter_documents(Path(config.corpus), report, follow_symlinks=config.follow_symlinks)
    refs = _timed_iter(chunk_documents(docs, ck.tokenizer, config.max_tokens, config.boundary, config.min_fill), timer, "read+chunk")
    progress({"event": "start", "total_bytes": corpus_bytes(Path(config.corpus))})
    shard_meta = {"quant": scheme.name, "model_config_sha256": model_id["config_sha256"],
                  "created_by": f"m3compile {__version__}"}
    a = ck.args
    s = dict(references=0, tokens=0, kept_kv=0, payload_bytes=0, raw_bytes=0, err=ZERO_ERROR, rel_errs=[])
    ref_id = 0
    with ShardWriter(out, shard_meta, config.max_shard_bytes) as writer, \
            refs_file.ReferenceWriter(out / refs_file.FILE_NAME) as table:
        for batch in _batches(refs, config.batch_size):
            with timer("encode"):
                encoded = encode_batch(ck.model, [r.token_ids for r in batch], prefix_ids, layers,
                                       pad_to=config.max_tokens)
            with timer("sparsify"):
                memories = select_topk(encoded, config.top_k)
            for r, mem in zip(batch, memories):
                with timer("quantize+compress"):
                    frame, err = encode_payload(mem.keys, mem.values, mem.positions, scheme)
                with timer("write"):
                    loc = writer.add(ref_id, frame)
                    K = mem.positions.shape[-1]
                    table.add({"ref_id": ref_id, "doc_id": r.doc_id, "source": r.source, "index": r.index,
                               "char_start": r.char_start, "char_end": r.char_end, "n_tokens": len(r.token_ids),
                               "token_ids": list(r.token_ids), "text": r.text, "n_kept": K,
                               "shard": loc.shard, "byte_offset": loc.byte_offset, "byte_length": loc.byte_length,
                               "quant_rel_err": err.rel, "quant_max_err": err.max_abs})
                s["references"] += 1
                s["tokens"] += len(r.token_ids)
                s["kept_kv"] += len(layers) * a.n_kv_heads * K
                s["payload_bytes"] += len(frame)
                s["raw_bytes"] += payload_nbytes(scheme, len(layers), a.n_kv_heads, K, a.head_dim)
                s["err"] = s["err"].merge(err)
                s["rel_errs"].append(err.rel)
                ref_id += 1
            progress({"event": "batch", "refs": len(batch), "tokens": sum(len(r.token_ids) for r in batch),
                      "bytes": sum(len(r.text.encode("utf-8")) for r in batch)})
        with timer("write"):
            writer.close()
    report.raise_if_empty()
    if s["references"] == 0:
        raise M3Error(f"corpus {config.corpus} has documents but no tokens to compile; check the texts")
    with timer("write"):
        write_shard_index(out, writer.shards, writer.metadata)
    (out / TOKENIZER_COPY).write_bytes((ck.path / "tokenizer.json").read_bytes())
    with timer("index"):
        t = refs_file.read_references(out / refs_file.FILE_NAME, ["ref_id", "text"]).to_pydict()
        s["retrieval"] = build_indexes(out, t["ref_id"], t["text"], config.embedder, config.index_factory,
                                       config.device)["retrieval"]
    s["shards"] = [sh.file for sh in writer.shards]
    s["report"] = report
    return s


def _build_manifest(config, ck, model_path, model_id, layers, prefix_ids, scheme, s, report, out) -> dict:
    a = ck.args
    L, H, D = len(layers), a.n_kv_heads, a.head_dim
    files = sorted(s["shards"]) + [INDEX_NAME, refs_file.FILE_NAME, TOKENIZER_COPY] + s["retrieval"]["files"]
    file_entries = {name: mf.file_entry(out, name) for name in files}
    n = s["references"]
    rel = s["rel_errs"]
    return {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "created_by": f"m3compile {__version__}",
        "config": config.to_dict(),
        "memory_settings": list(MEMORY_SETTINGS),
        "model": {"path": str(config.model) if config.model is not None else "<embedded example>",
                  **model_id, "n_layers": a.n_layers, "n_kv_heads": H, "n_heads": a.n_heads, "head_dim": D,
                  "dtype": config.dtype},
        "write": {
            "prefix_text": config.prefix,
            "prefix_ids": prefix_ids,
            "memory_layers": list(layers),
            "top_k": config.top_k,
            "max_tokens": config.max_tokens,
            "chunk_rule_version": CHUNK_RULE_VERSION,
            # reference token j was encoded at RoPE position len(prefix_ids) + j
            "position_offset": len(prefix_ids),
            "rope": "post",
            "selection": "logsumexp over group query heads and reference queries of pre-RoPE q.k/sqrt(D), "
                         "no causal mask, prefix and padding excluded, ties to lower j",
        },
        "quant": {
            "scheme": scheme.name,
            "bits_per_element_at_top_k": round(bits_per_element(scheme, L, H, config.top_k, D), 4),
            "bits_per_element_stored": round(8 * s["raw_bytes"] / (2 * s["kept_kv"] * D), 4),
            "bits_per_element_compressed": round(8 * s["payload_bytes"] / (2 * s["kept_kv"] * D), 4),
            "rel_err_max": max(rel),
            "rel_err_mean": sum(rel) / n,
            "max_abs_err": s["err"].max_abs,
        },
        "counts": {
            "documents": report.documents,
            "references": n,
            "tokens": s["tokens"],
            "kept_kv": s["kept_kv"],
            "shards": len(s["shards"]),
            "skipped": dict(sorted(report.skipped.items())),
        },
        "sizes": {
            "payload_bytes": s["payload_bytes"],
            "payload_raw_bytes": s["raw_bytes"],
            # the same references' key-values kept whole in bf16, in every layer: the paper's dense baseline
            "dense_bf16_bytes": s["tokens"] * a.n_layers * 2 * H * D * 2,
            "sparse_bf16_bytes": s["kept_kv"] * 2 * D * 2,
            "files_bytes": sum(e["bytes"] for e in file_entries.values()),
        },
        "files": file_entries,
        "retrieval": s["retrieval"],
        "run_log": mf.RUN_LOG,
    }
