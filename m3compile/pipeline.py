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

A compile also repairs (formats/manifest.md, "Repair"): a shard whose bytes are no longer those the
manifest records is rebuilt under its own name from its frames that still check and by encoding
the rest again; a damaged generation is built anew; a damaged references table is recovered from
the corpus and the shards' content keys. Healthy shards are never touched. `repair_kb` is the same
run without reading the corpus (`m3 verify --repair`).
"""

import hashlib
import itertools
import json
import os
import platform
import signal
import socket
import tempfile
import time
from array import array
from collections import Counter, defaultdict
from contextlib import ExitStack, closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tokenizers

from m3compile import __version__, manifest as mf, references as refs_file, store
from m3compile.checkpoint import ModelArgs, _read_config, fingerprint, weight_files
from m3compile.chunk import chunk_documents
from m3compile.config import (BATCH_TOKENS, KB_DEFAULTS, MODEL_MEMORY_FILE, PAPER_DEFAULTS, READ_SETTINGS, RUN_SETTINGS, CompileConfig,
                              default_model_dir, describe_settings, read_model_memory)
from m3compile.corpus import RECORD_SUFFIXES, TEXT_SUFFIXES, CorpusReport, iter_documents
from m3compile.distribute import (Frames, RaySession, check_ray, encode_frames, local_frames, pool_frames,
                                  ray_frames, ray_references)
from m3compile.errors import M3Error
from m3compile.index import DenseReuse, check_index_factory, index_references, resolve_embedder
from m3compile.pack import (CODEC, FORMAT, FORMAT_VERSION, LAYOUT, ZSTD_LEVEL, ShardReaders, ShardWriter,
                            check_frame, shard_info, write_shard_index)
from m3compile.spec import MemorySpec
from m3compile.tokenizer import Tokenizer

Progress = Callable[[dict], None]  # receives {"event": "start"|"batch"|"done", ...}
# the compile option behind a MemorySpec field, for messages only: the kb's identity is the field
MODEL_FINGERPRINT = {"model_config_sha256": "config.json differs", "model_weights_sha256": "weights differ",
                     "tokenizer_sha256": "tokenizer differs"}
OPTION_OF = {"model_config_sha256": "--model", "model_weights_sha256": "--model", "tokenizer_sha256": "--model",
             "width": "--max-tokens", "boundary": "--boundary", "min_fill": "--min-fill", "prefix": "--prefix",
             "prefix_ids": "--prefix", "memory_layers": "--memory-layers", "top_k": "--top-k", "quant": "--quant",
             "dtype": "--dtype"}


class Timer:
    """Wall seconds per stage, accumulated across batches. Stages are exclusive: a stage timed
    inside another (the index, built while a generation is written) is not counted in the outer
    one too, so the stages add up to at most the wall time. One thread times stages."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[str] = []  # the stages being timed, outermost first

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        self._open.append(stage)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - t0
            self.seconds[stage] += took
            if self._open:
                self.seconds[self._open[-1]] -= took


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
        raise M3Error("no --model given and the embedded model is not in this installation "
                      f"({path}); reinstall m3compile, or pass --model path/to/hf-checkpoint")
    log(f"no --model given: using the embedded memory reader {path}")
    return path


def relative_to_kb(path: str | None, kb_dir: Path, always: bool = False) -> str | None:
    """A path the user gave, as the manifest records it: relative to the kb directory, so that no
    machine's absolute path is stored and the same corpus given either way is the same setting.
    Names that are not paths on this machine (e.g. an embedder word) are kept as given, unless
    `always` (a corpus or model, which are paths even where they are gone: a repair runs without
    its corpus, and must record the same "../corpus" the kb did)."""
    if path is None or not (always or Path(path).exists()):
        return path
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(kb_dir))).as_posix()


def config_record(config: CompileConfig, kb_dir: Path) -> dict:
    """The manifest's `config`: the settings as run, less run settings, paths relative to the kb."""
    d = {k: v for k, v in config.to_dict().items() if k not in RUN_SETTINGS}
    if not config.quant.startswith("vq"):  # settings of codebooks a kb without them does not record
        d = {k: v for k, v in d.items() if not k.startswith("codebook_")}
    for k in ("corpus", "model", "embedder"):
        d[k] = relative_to_kb(d[k], kb_dir, always=k != "embedder")
    return d


class _Checkpoint:
    """The compile's model as model.Checkpoint holds it (`args`, `tokenizer`, `path`, `model`), with
    the weights loaded when `model` is first asked for. A compile that finds its kb up to date (and
    `m3 compile --check` in CI) needs the shape and the tokenizer, never the weights: it then imports
    no torch (~1.1 s of a 1.7 s check) and converts no weights (a bf16 checkpoint compiled in float32:
    5.5 GB of RAM and 2.8 s for a 0.89B model before, 0.1 GB and 0.4 s now)."""

    def __init__(self, path: Path, config: CompileConfig, timer: "Timer"):
        self.path, self._config, self._timer = path, config, timer
        self.args = ModelArgs.from_hf_config(_read_config(path))
        self.tokenizer = Tokenizer.from_dir(path)
        self._stamps = self._files_stamps()  # before fingerprint() hashes the files

    def _files_stamps(self) -> dict:
        return {f.name: store.file_stamp(f.stat()) for f in [self.path / "config.json", self.path / "tokenizer.json",
                                                       *weight_files(self.path)]}

    def check_unchanged(self) -> None:
        """An error if the model's files changed since they were fingerprinted (a training job that
        saved into the checkpoint meanwhile): the manifest would record other weights than those
        that encode. The weights now load after the kb is read, which can take a while."""
        if self._files_stamps() != self._stamps:
            raise M3Error(f"the model's files in {self.path} changed while this compile ran; nothing was written: "
                          "run the command again once they stay unchanged")

    @cached_property
    def model(self):
        from m3compile.model import load_checkpoint

        with self._timer("load_model"):
            return load_checkpoint(self.path, device=self._config.device, dtype=self._config.dtype).model


@dataclass
class Setup:
    """What a compile derives from its config and model before reading the corpus."""

    config: CompileConfig
    ck: _Checkpoint
    model_path: Path
    model_id: dict
    spec: MemorySpec
    context: bytes  # spec.key_context(), shared by every content key
    vq: dict | None = None  # the codebooks' manifest entry, for a vector-quantized kb
    ray: RaySession | None = None  # --engine ray: the compile's connection, for cutting and encoding


def _setup(config: CompileConfig, log, out: Path | None = None) -> tuple[Setup, Timer]:
    """The compile's setup; `out` the kb it writes to, whose width (if it has one) passes the
    check that only new widths take (MemorySpec.from_config: a kb of that width is grown,
    checked and repaired as before)."""
    timer = Timer()
    if config.engine == "ray":
        check_ray(config.ray_address)
    model_path = resolve_model(config, log)
    config, adopted = config.resolved(model_path)
    resolve_embedder(config.embedder)  # an unknown word or a missing package fails now, not after encoding
    if config.embedder:
        check_index_factory(config.embedder, config.index_factory, config.device)  # so does a bad factory
    news = {k: v for k, v in adopted.items() if v != PAPER_DEFAULTS[k]}  # what differs from the paper's
    if news:
        log(f"using the memory settings {config.model or 'the embedded model'} was trained to read "
            f"({MODEL_MEMORY_FILE}): {describe_settings(news)}")
    with timer("load_model"):  # the shape, the tokenizer and the identity; the weights when first used
        ck = _Checkpoint(model_path, config, timer)
        model_id = fingerprint(model_path)
    kept = None
    if out is not None and (out / mf.FILE_NAME).is_file():
        try:
            kept = mf.read_manifest(out).spec.width
        except M3Error:
            pass  # the compile names it
    spec = MemorySpec.from_config(config, ck, model_id, kept_width=kept)
    _note_model_memory(config, model_path, spec.memory_layers, log)
    return Setup(config, ck, model_path, model_id, spec, spec.key_context()), timer  # config resolved


def _note_encoding(config: CompileConfig, log) -> None:
    """What a compile that will encode says about its dtype and threads (after the up-to-date check:
    torch is imported here)."""
    import torch

    from m3compile.model import bf16_is_native

    if config.dtype == "bfloat16" and torch.device(config.device).type == "cuda" and not bf16_is_native(config.device):
        # dtype is part of the memories' bytes, so it is never switched behind the user's back. (A CPU
        # without bf16 units runs bf16 products in float32, as fast as a float32 compile: model.linear)
        log(f"note: --dtype bfloat16 on {config.device}, a GPU without bf16 support (before Ampere): torch "
            "emulates bf16 matmuls there; --dtype float32 compiles faster (other bytes)")
    threads = torch.get_num_threads()
    if (config.dtype == "bfloat16" and torch.device(config.device).type == "cpu" and config.cpus_per_worker != threads
            and (config.engine == "ray" or config.engine_workers > 1)):
        # measured on a CPU with AMX: 880 of 881 memories of the 110M shape differ between 1 and 2 threads
        log(f"note: bf16 memories depend on the torch thread count on some CPUs (with AMX they do); workers encode "
            f"on {config.cpus_per_worker} (--cpus-per-worker), a local compile here on {threads}, so their bytes "
            f"may differ; --cpus-per-worker {threads} gives a local compile's")


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


def _frozen_codebooks(out: Path, spec: MemorySpec):
    """(codebooks, manifest entry, the kb's recorded config) of the kb in `out` when its memories
    are `spec`'s but for the codebooks, which an incremental compile then keeps; else None. A
    damaged codebooks file is one error naming it (codebooks.read)."""
    from m3compile import codebooks

    try:
        old = mf.read_manifest(out) if (out / mf.FILE_NAME).is_file() else None
    except M3Error:
        return None
    entry = old.quant.get("vq") if old is not None else None
    if entry is None or old.spec.differences(replace(spec, codebooks_sha256=entry["sha256"])):
        return None
    return codebooks.read(out, entry), entry, old.config


def _keep_codebook_settings(setup: Setup, recorded: dict, log) -> CompileConfig:
    """With the kb's codebooks kept, the --codebook-sample and --codebook-seed its config
    (`recorded`) holds stay its own: other values given would be recorded beside codebooks they
    did not train (they apply with --retrain-codebooks). Returns the config, also set on `setup`."""
    config = setup.config
    kept = {k: recorded.get(k) for k in ("codebook_sample", "codebook_seed")}
    given = {k: getattr(config, k) for k in kept}
    if None not in kept.values() and given != kept:
        log(f"note: the kb's codebooks are kept (trained with --codebook-sample {kept['codebook_sample']} "
            f"--codebook-seed {kept['codebook_seed']}); the values given apply with --retrain-codebooks")
        setup.config = config = replace(config, **kept)
    return config


def _train_codebooks(out: Path, setup: Setup, timer: Timer, log):
    """Codebooks trained now on a seeded sample of the corpus's references (formats/vq-codebooks.md),
    written into `out`; returns them and their manifest entry."""
    from m3compile import codebooks

    spec, config = setup.spec, setup.config
    with timer("read+chunk"):
        docs = iter_documents(Path(config.corpus), CorpusReport(), follow_symlinks=config.follow_symlinks)
        refs = (r.token_ids for r in chunk_documents(docs, setup.ck.tokenizer, spec.width, spec.boundary,
                                                      spec.min_fill))
        sample = codebooks.sample_references(refs, config.codebook_sample, config.codebook_seed)
    batch = config.refs_per_batch(spec.width)
    inputs = _training_inputs(spec, config.codebook_seed, batch, config.device, sample)
    trained = _trained_before(out, inputs)
    if trained is not None:  # this compile was killed after training them: the same inputs, the same bytes
        log(f"{spec.quant} codebooks: the ones an interrupted run of this compile trained on the same "
            f"{len(sample)} references ({trained[1]['path']}), not trained again")
        return trained
    with timer("train_codebooks"):
        cb, err = codebooks.train(setup.ck.model, sample, spec, config.codebook_seed, batch)
    entry = {**codebooks.write(out, cb), "train_references": len(sample), "train_rel_err_mean": err}
    _record_trained(out, inputs, entry)
    crash_point("codebooks")
    log(f"trained {spec.quant} codebooks ({cb.factory}, {len(cb.codecs)} codecs) on {len(sample)} references: "
        f"relative error {err:.4f}")
    few, k = min(cb.n_train.values(), default=0), cb.centroids()
    if k and few < 39 * k:  # FAISS's own advice (39 vectors a centroid), which its k-means no longer prints
        log(f"note: {few:,} training vectors a codec, under the {39 * k:,} that k-means over {k} centroids "
            "wants: codebooks of a kb this small fit it closely; on a bigger corpus they generalise")
    return cb, entry


TRAINED = "codebooks-trained.json"  # in .spill/: the codebooks this compile trained, and on what (_record_trained)


def _training_inputs(spec: MemorySpec, seed: int, batch: int, device: str, sample: list[list[int]]) -> str:
    """sha256 of everything codebook training reads or is: the write recipe (model digests, prefix,
    layers, top-k, quant, dtype), seed, batch, device, the m3compile and FAISS versions (training
    code), and the sampled references' token ids."""
    import faiss

    h = hashlib.sha256(json.dumps({"batch": batch, "context": spec.key_context().hex(), "device": device,
                                   "faiss": faiss.__version__, "m3compile": __version__, "seed": seed},
                                  sort_keys=True).encode())
    for ids in sample:
        h.update(np.asarray([len(ids), *ids], dtype="<i4").tobytes())
    return h.hexdigest()


def _record_trained(out: Path, inputs: str, entry: dict) -> None:
    """Note in .spill/ which codebooks file training wrote from which inputs, so that a compile
    killed before its commit (which drops .spill/) does not train them again when resumed: they
    take ~14 s for 1 MB with the default model, and minutes for a big model on a CPU."""
    spill = out / store.SPILL_DIR
    spill.mkdir(exist_ok=True)
    tmp = spill / f".{TRAINED}.tmp"
    tmp.write_text(json.dumps({"inputs": inputs, "entry": entry}, sort_keys=True))
    os.replace(tmp, spill / TRAINED)


def _trained_before(out: Path, inputs: str):
    """(codebooks, manifest entry) that an interrupted run trained from these very inputs, if its
    note and its codebooks file (checked against the sha256 noted) are both whole; else None."""
    from m3compile import codebooks

    try:
        note = json.loads((out / store.SPILL_DIR / TRAINED).read_text())
        if note["inputs"] != inputs:
            return None
        entry = note["entry"]
        float(entry["train_rel_err_mean"]), int(entry["train_references"])
        return codebooks.read(out, entry), entry
    except (OSError, ValueError, TypeError, KeyError, M3Error):  # absent or damaged: trained again
        return None


def _use_codebooks(setup: Setup, cb, entry: dict) -> None:
    setup.spec = setup.spec.with_codebooks(cb, entry["sha256"])
    setup.context, setup.vq = setup.spec.key_context(), entry


# ---- the previous kb ------------------------------------------------------------------------------

@dataclass
class Previous:
    manifest: mf.Manifest | None = None
    # live references: columns read from the table, or dicts of shard locations if recovered
    rows: "refs_file.Rows | list[dict]" = field(default_factory=list)
    next_ref_id: int = 0
    next_shard: int = 1
    damaged: dict[str, str] = field(default_factory=dict)  # kb file -> what is wrong with it
    checked: dict = field(default_factory=dict)  # kb file that holds -> (stamp, sha256): store.damaged_files
    rows_recovered: bool = False  # the references table was damaged: rows come from the shards
    tokenizers: str | None = None  # the tokenizers library that cut its references (run.json), if known
    # (documents, corpus report) when the kb is up to date (_up_to_date): no rows read, nothing to do
    up_to_date: "tuple[dict[str, int], CorpusReport] | None" = None


def _previous(out: Path, setup: Setup, rebuild: bool, log, spill_dir: Path | None = None,
              quick: bool = False) -> Previous:
    """The kb already in `out` (its manifest, damage and live rows); `quick`: first see whether it
    is up to date without reading its rows (_up_to_date)."""
    if not (out / mf.FILE_NAME).exists():
        return Previous()
    try:
        manifest = mf.read_manifest(out)
    except M3Error as e:
        if rebuild:
            log(f"the existing kb's manifest cannot be read ({e}); compiling anew")
            return Previous()
        raise M3Error(f"the existing kb in {out} cannot be read ({e}); pass --rebuild to compile it anew") from None
    checked: dict = {}
    damaged = store.damaged_files(out, manifest.files, checked)
    for name, why in damaged.items():
        log(f"damaged: {name}: {why}; it is rebuilt")
    next_shard = 1 + max((store.shard_number(s) for s in manifest.shards), default=0)
    if rebuild:
        # start over: no reference keeps its id, but frames on disk that still check are found by key
        return Previous(manifest, [], 0, next_shard, damaged, checked)
    differ = manifest.spec.differences(setup.spec)
    if differ:
        name = differ[0]
        if name in MODEL_FINGERPRINT:  # digests say nothing to a user: name the two checkpoints
            now = setup.config.model if setup.config.model is not None else "the embedded model"
            raise M3Error(f"{out} was compiled with another model ({manifest.model.get('path')}; its "
                          f"{MODEL_FINGERPRINT[name]} from {now}'s): pass --model with that checkpoint to "
                          "grow the kb, or --rebuild to compile it anew with this one (it stays readable until "
                          "the new one is committed)")
        option = f"; option {OPTION_OF[name]}" if name in OPTION_OF else ""
        # the memory settings left out are the model's, not the kb's: growing a kb compiled with
        # others takes them given again (--rebuild alone would recompile it with these)
        keep = f"give {OPTION_OF[name]} as the kb has it to grow it, or " if name in OPTION_OF else ""
        raise M3Error(f"{out} was compiled with a different {name} ({_short(getattr(manifest.spec, name))} vs "
                      f"{_short(getattr(setup.spec, name))} now{option}); its memories cannot be mixed with these: "
                      f"{keep}pass --rebuild to compile the kb anew with these (it stays readable until the new "
                      "one is committed)")
    refs_name = manifest.paths["references"]
    tokenizers_then = _run_log(out).get("tokenizers")
    if quick and not damaged:
        done = _up_to_date(setup, out, manifest, tokenizers_then)
        if done is not None:
            return Previous(manifest, [], manifest.state["next_ref_id"], next_shard, damaged, checked,
                            tokenizers=tokenizers_then, up_to_date=done)
    rows = None
    if refs_name not in damaged:
        try:  # as columns, token ids and texts spilled beside the plan's (not ~1 KB a row as dicts)
            rows = refs_file.read_reference_rows(out / refs_name, spill_dir)
        except M3Error as e:
            log(f"damaged: {refs_name}: {e}")
    if rows is None:
        return Previous(manifest, _rows_from_shards(out, manifest), manifest.state["next_ref_id"], next_shard,
                        damaged, checked, rows_recovered=True)
    return Previous(manifest, rows, manifest.state["next_ref_id"], next_shard, damaged, checked,
                    tokenizers=tokenizers_then)


def _up_to_date(setup: Setup, out: Path, manifest: mf.Manifest,
                tokenizers_then: str | None) -> "tuple[dict[str, int], CorpusReport] | None":
    """(documents, corpus report) when a compile would change nothing, decided from the corpus and
    three columns of the table instead of every row: SciFact's no-change compile read its 150k rows,
    computed their content keys and compared them (1.6 s; O(rows) at any scale). It would change
    nothing when this m3compile wrote the kb with the same settings and tokenizers library (run.json,
    as _previous_documents trusts it) and the corpus holds the kb's documents, each with the same
    text and file, none missing, in the order of that compile (the manifest's state, committed
    with the rows): then each is cut into the references it was (the cut is a function of those),
    each key's references go to the same documents, and _unchanged would hold. None otherwise (the plan decides, as without this): a kb
    written before 2026-12-06 (no `corpus_order`) until its next compile that changes something.
    It stops at the first document that differs; a change at the corpus's end costs a second
    reading and hashing of the corpus (SciFact: 0.07 s)."""
    state = manifest.state
    if manifest.created_by != f"m3compile {__version__}" or tokenizers_then != tokenizers.__version__ \
            or not state.get("corpus_order") or config_record(setup.config, out) != manifest.config:
        return None
    before = refs_file.document_keys(out / manifest.paths["references"])
    if before is None:
        return None
    report, n, order = CorpusReport(), 0, hashlib.sha256()  # the order hashed as it streams
    for d in iter_documents(Path(setup.config.corpus), report, follow_symlinks=setup.config.follow_symlinks):
        if before.get(d.doc_id) != (_text_sha256(d.text), d.source):
            return None
        n += 1
        _add_to_order(order, d.doc_id)
    # the documents in the order of the compile that wrote the kb: references of equal content keys
    # (equal texts) go to documents in corpus order (_ByKey), so another order would move ref ids
    if n != len(before) or order.hexdigest() != state["corpus_order"]:
        return None
    return {"added": 0, "changed": 0, "unchanged": n, "removed": 0, "kept": 0}, report


def _corpus_order(doc_ids) -> str:
    """sha256 of the corpus's document ids in the order a compile reads them (manifest state
    `corpus_order`), each followed by a NUL byte."""
    h = hashlib.sha256()
    for d in doc_ids:
        _add_to_order(h, d)
    return h.hexdigest()


def _add_to_order(h, doc_id: str) -> None:
    """One document of _corpus_order's hash `h`: its id, then a NUL byte."""
    h.update(doc_id.encode("utf-8") + b"\0")


def _run_log(out: Path) -> dict:
    """The kb's run.json (what the last compile did), or {} where it is missing or unreadable."""
    try:
        run = json.loads((out / mf.RUN_LOG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _rows_from_shards(out: Path, manifest: mf.Manifest) -> list[dict]:
    """What the shards still say of the live references when the references table is lost: id,
    content key and frame location. The corpus supplies the rest (_plan matches them by key)."""
    rows = []
    for name in sorted(manifest.shards):
        try:
            found = store.shard_frames(out / name)
        except Exception:  # an unreadable shard's references are encoded again
            continue
        for ref_id, key, f in found:
            rows.append({"ref_id": ref_id, "ref_key": key.hex(), "shard": name, "byte_offset": f.offset,
                         "byte_length": f.length, "quant_rel_err": f.rel_err, "quant_max_err": f.max_err})
    return sorted(rows, key=lambda r: r["ref_id"])


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---- planning -------------------------------------------------------------------------------------

@dataclass
class Plan:
    # the live references after this compile, in ref id order (reused rows complete, new ones
    # located as they are written); a repair's plan holds the previous kb's list of dicts
    rows: "refs_file.Rows | list[dict]"
    new: "refs_file.Rows | list[dict]"  # rows to fill by encoding or copying, in ref id order (rows of the same store)
    removed: "refs_file.Rows | list[dict]"  # live rows that leave (tombstoned): a view of the previous rows
    docs: dict[str, int]  # added / changed / removed / unchanged / kept
    report: CorpusReport
    corpus_order: str | None = None  # _corpus_order of the corpus's documents; None: a repair's (the kb's own)


def _plan(setup: Setup, prev: Previous, keep_missing: bool, timer: Timer, spill_dir: Path | None = None) -> Plan:
    """What this compile does with each reference of the corpus (kept, new, removed). The rows'
    token ids and texts are spilled to an anonymous file in `spill_dir` (the kb's own directory, or
    the system's temporary one: refs_file.RefColumns), so the plan's memory stays small (issue 16)."""
    config = setup.config
    report = CorpusReport()
    doc_sha: dict[str, str] = {}

    def hashed(docs):
        for d in docs:
            doc_sha[d.doc_id] = _text_sha256(d.text)
            yield d

    docs = hashed(iter_documents(Path(config.corpus), report, follow_symlinks=config.follow_symlinks))
    old = _ByKey(prev.rows)
    store = refs_file.RefColumns(spill_dir)
    try:
        return _plan_into(store, setup, prev, old, docs, doc_sha, report, keep_missing, timer)
    except BaseException:
        store.close()
        raise


def _previous_documents(prev: Previous) -> tuple[dict[str, str], dict[str, tuple[int, str | None]], np.ndarray,
                                                   np.ndarray, np.ndarray]:
    """The previous kb's documents, from one pass over its table's columns: (doc_id -> its text's
    sha256 (the last row's), the documents whose rows can be given back uncut: doc_id -> (its
    number k, that sha256), positions of prev.rows by document then index, bounds: document k's
    rows are positions[bounds[k]:bounds[k + 1]], and the char_end of each document's last row).
    Numpy arrays, ~16 bytes a row held, not the rows
    (issue 16). Rows recovered from shards hold no documents: all empty.

    None can be given back when the kb's last compile ran another tokenizers library (run.json; a
    kb from before 2026-12-04 has none): the same tokenizer.json could cut differently there. A
    document whose rows carry two text hashes is not given back (cut again)."""
    hashes: dict[str, str] = {}
    docs: dict[str, tuple[int, str | None]] = {}
    codes, index, ends = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    if isinstance(prev.rows, refs_file.Rows):
        reuse, mixed = prev.tokenizers == tokenizers.__version__, set()
        for c in refs_file.iter_columns(prev.rows, ("doc_id", "doc_sha256", "index", "char_end")):
            for d, h in zip(c["doc_id"], c["doc_sha256"]):
                if hashes.setdefault(d, h) != h:
                    mixed.add(d)
                    hashes[d] = h
            if reuse:
                codes.append(np.fromiter((docs.setdefault(d, (len(docs), hashes[d]))[0] for d in c["doc_id"]),
                                         np.int64, len(c["doc_id"])))  # (block,)
                index.append(np.asarray(c["index"], np.int64))  # (block,)
                ends.append(np.asarray(c["char_end"], np.int64))  # (block,)
        for d in mixed & docs.keys():
            docs[d] = (docs[d][0], None)  # matches no text: cut again
    codes, index, ends = np.concatenate(codes), np.concatenate(index), np.concatenate(ends)  # (R,) each
    order = np.lexsort((index, codes))  # (R,) positions by document, then index
    bounds = np.searchsorted(codes[order], np.arange(len(docs) + 1))  # (N + 1,)
    # rows given back uncut must be all the document's references: indexes 0..n-1, the last ending at
    # the text's end (_references checks that against the text). A document some of whose rows went
    # to another of equal text (content keys are matched across documents: --keep-missing) is cut again
    if len(order):
        at = np.arange(len(order)) - np.repeat(bounds[:-1], np.diff(bounds))  # (R,) each row's place in its document
        gaps = np.unique(codes[order][index[order] != at])
        if len(gaps):
            by_code = {k: d for d, (k, _) in docs.items()}
            for k in gaps.tolist():
                docs[by_code[k]] = (k, None)
    last_end = np.full(len(docs), -1, np.int64)  # (N,) char_end of each document's last row
    nonempty = np.diff(bounds) > 0
    last_end[nonempty] = ends[order][bounds[1:][nonempty] - 1]
    return hashes, docs, order, bounds, last_end


GIVE_BACK_ROWS = 4096  # rows of unchanged documents taken from the previous kb at once (~1 MB held)


def _references(setup: Setup, prev: Previous, docs, doc_sha: dict, previous: tuple) -> Iterator[tuple]:
    """The corpus's references in order, as pairs: (a plan row without its key, token_ids an
    array("i"); None) for each reference cut now, and ([(doc_id, source, row count)], positions in
    prev.rows of those rows in order) for documents given back, GIVE_BACK_ROWS rows at a time.

    A document the kb holds with the same text (doc_id and sha256) gives back its previous rows
    without being tokenized again: they are the references chunk_documents would cut, since cutting
    is a function of the text, the tokenizers library (_previous_documents) and settings that are
    part of the kb's identity (tokenizer, width, boundary, min_fill, chunk rule: _previous refused a
    kb that differs in any). A no-op compile or `--check` of SciFact then tokenizes nothing.
    `previous` is _previous_documents(prev).
    """
    spec = setup.spec
    _, seen, order, bounds, last_end = previous

    def unchanged(d) -> bool:
        return d.doc_id in seen and seen[d.doc_id][1] == doc_sha[d.doc_id] and last_end[seen[d.doc_id][0]] == len(d.text)

    for same, group in itertools.groupby(docs, key=unchanged):
        if same:  # given back GIVE_BACK_ROWS rows at a time (a long document in parts, short ones together)
            run, at, n = [], [], 0
            for d in group:
                k = seen[d.doc_id][0]
                lo, hi = int(bounds[k]), int(bounds[k + 1])
                while lo < hi:
                    part = min(hi - lo, GIVE_BACK_ROWS - n)
                    run.append((d.doc_id, d.source, part))
                    at.append(order[lo:lo + part])
                    lo, n = lo + part, n + part
                    if n == GIVE_BACK_ROWS:
                        yield run, np.concatenate(at)
                        run, at, n = [], [], 0
            if run:
                yield run, np.concatenate(at)
            continue
        if setup.ray is not None:  # --engine ray: cut by Ray actors, the same references
            refs = ray_references(setup.ray, group, setup.ck.tokenizer, spec.width, spec.boundary, spec.min_fill,
                                  setup.config.engine_workers, setup.config.cpus_per_worker)
        else:
            refs = chunk_documents(group, setup.ck.tokenizer, spec.width, spec.boundary, spec.min_fill)
        for ref in refs:
            yield ({"doc_id": ref.doc_id, "source": ref.source, "index": ref.index, "char_start": ref.char_start,
                    "char_end": ref.char_end, "n_tokens": len(ref.token_ids), "token_ids": array("i", ref.token_ids),
                    "text": ref.text, "doc_sha256": doc_sha[ref.doc_id]}, None)


def _plan_into(store: "refs_file.RefColumns", setup: Setup, prev: Previous, old: "_ByKey", docs, doc_sha: dict,
               report: CorpusReport, keep_missing: bool, timer: Timer) -> Plan:
    """_plan's work, its rows appended to `store`."""
    config, spec = setup.config, setup.spec
    new, next_id = _Positions(), prev.next_ref_id  # new: store positions
    previous = _previous_documents(prev)
    with_rows: set[str] = set()  # documents that gave a reference
    with timer("read+chunk"):
        for item, at in _references(setup, prev, docs, doc_sha, previous):
            if at is not None:  # documents given back: their rows at once, as the loop below would add them
                with_rows.update(d for d, _, _ in item)
                src = prev.rows.store
                records = src.records(refs_file.positions_at(prev.rows.positions, at))  # (n,)
                variable = src.variable(records)
                keys = np.frombuffer(b"".join(spec.ref_key(np.frombuffer(v, "<i4", c), setup.context)
                                              for v, c in zip(variable, records["n_tokens"].tolist())), "V32")  # (n,)
                same = old.take_many(keys)  # (n,) prev.rows positions, -1: not in the kb (a new row)
                frames = np.where(same >= 0, refs_file.positions_at(prev.rows.positions, np.maximum(same, 0)), -1)
                counts = [c for _, _, c in item]  # rows of each document
                got = store.extend_from(src, records, variable, frames=frames, new_id=next_id, key=keys,
                                        n_kept=np.minimum(spec.top_k, records["n_tokens"]),
                                        doc_id=([d for d, _, _ in item], counts),
                                        source=([source for _, source, _ in item], counts),
                                        doc_sha256=([doc_sha[d] for d, _, _ in item], counts))
                for j in np.flatnonzero(same < 0).tolist():
                    new.append(got[j])
                next_id += int(np.sum(same < 0))
                continue
            meta = item
            with_rows.add(meta["doc_id"])
            key = spec.ref_key(meta["token_ids"], setup.context)
            meta.update(ref_key=key.hex(), n_kept=min(spec.top_k, meta["n_tokens"]))
            same = old.take(key)
            if same is not None:
                # the kb already holds this memory: keep its id and its frame
                store.append({**prev.rows[same], **meta})
            else:
                new.append(store.append({"ref_id": next_id, **meta}))
                next_id += 1
    for d in [d for d in doc_sha if d not in with_rows]:
        # text the tokenizer keeps nothing of (control characters a normaliser drops): no reference,
        # so not a document of the kb either, or it would be "added" by every compile and --check
        report.skip("no-tokens", d, None, "the tokenizer keeps nothing of its text")
        report.documents -= 1
        del doc_sha[d]
    report.raise_if_empty()
    if not len(store):
        raise M3Error(f"corpus {config.corpus} has documents but no tokens to compile; check the texts")
    # the previous rows no new row took: kept (--keep-missing, a document absent from this corpus) or
    # removed. A view of the previous rows, not their dicts: with their token ids and texts those took
    # ~1.5 KB a row when most of a corpus was replaced (issue 16)
    left = np.asarray(old.left(), dtype=np.int64)
    if isinstance(prev.rows, refs_file.Rows):
        old_docs = previous[0]

        def leftover(at):
            return refs_file.Rows(prev.rows.store, refs_file.positions_at(prev.rows.positions, left[at]))

        doc_ids = (d for c in refs_file.iter_columns(leftover(slice(None)), ("doc_id",)) for d in c["doc_id"])
    else:  # rows recovered from the shards hold no document
        old_docs = {r["doc_id"]: r["doc_sha256"] for r in prev.rows if "doc_id" in r}

        def leftover(at):
            return [prev.rows[int(j)] for j in left[at]]

        doc_ids = (prev.rows[int(j)].get("doc_id", "") for j in left)
    keep = np.fromiter((keep_missing and d in old_docs and d not in doc_sha for d in doc_ids), bool, len(left))
    removed = leftover(np.flatnonzero(~keep))
    for r in leftover(np.flatnonzero(keep)):
        store.append(r)
    # ref id order; a new kb's rows come in it: a range then, not 8 bytes a row (issue 16)
    # (the ids a block of records at a time: column() of every row held all 128-byte records at once)
    order = range(len(store)) if store.ascending else np.argsort(np.concatenate(
        [c["ref_id"] for c in refs_file.iter_columns(refs_file.Rows(store, range(len(store))), ("ref_id",))]),
        kind="stable")
    docs = {"added": sum(d not in old_docs for d in doc_sha),
            "changed": sum(d in old_docs and old_docs[d] != s for d, s in doc_sha.items()),
            "unchanged": sum(old_docs.get(d) == s for d, s in doc_sha.items()),
            "removed": 0 if keep_missing else sum(d not in doc_sha for d in old_docs),
            "kept": sum(d not in doc_sha for d in old_docs) if keep_missing else 0}
    return Plan(refs_file.Rows(store, order), refs_file.Rows(store, new.positions()), removed, docs,
                report, _corpus_order(doc_sha))


def _text_sha256(text: str, piece: int = 1 << 20) -> str:
    """sha256 of the text's UTF-8, encoded a piece at a time: a 50 MB single-line document is not
    copied whole (issue 16). A str sliced anywhere encodes to pieces of the whole's encoding."""
    h = hashlib.sha256()
    for i in range(0, len(text), piece):
        h.update(text[i:i + piece].encode("utf-8"))
    return h.hexdigest()


class _ByKey:
    """The previous kb's live rows by content key, each taken at most once: among rows of one key,
    the first in ref id order first. Keys are numpy arrays (~77 bytes a row: the keys in row order
    and sorted, the sorting permutation, a count per run of equal keys, a taken flag), not a dict
    of row dicts (~1 KB a row; issue 16: an incremental compile of a big kb)."""

    def __init__(self, rows):
        if isinstance(rows, refs_file.Rows):
            keys = rows.keys()
        else:
            keys = np.frombuffer(b"".join(bytes.fromhex(r["ref_key"]) for r in rows), dtype="V32")
        self.keys = keys  # (R,) in row order
        self.order = np.argsort(keys, kind="stable")  # (R,) by key (bytes), then by position
        self.sorted = keys[self.order]  # (R,)
        self.used = np.zeros(len(keys), dtype=np.int32)  # (R,) at a run's start: rows of that run taken
        self.taken = np.zeros(len(keys), dtype=bool)  # (R,) by position

    def _first(self, key: bytes) -> int:
        """Where `key`'s run starts in the sorted keys (its length if absent)."""
        return int(np.searchsorted(self.sorted, np.frombuffer(key, dtype="V32")[0]))

    def take(self, key: bytes) -> int | None:
        """The position of the first row with `key` not taken yet (and take it); None if none."""
        i0 = self._first(key)
        i = i0 + int(self.used[i0]) if i0 < len(self.sorted) else i0
        if i >= len(self.sorted) or self.sorted[i].tobytes() != key:
            return None
        self.used[i0] += 1
        j = int(self.order[i])
        self.taken[j] = True
        return j

    def take_many(self, keys: np.ndarray) -> np.ndarray:
        """`take` of each of `keys` (V32) in turn, at once: positions, -1 where none."""
        if not len(keys) or not len(self.sorted):
            return np.full(len(keys), -1, np.int64)
        i0 = np.searchsorted(self.sorted, keys)  # (K,) where each key's run starts
        by_key = np.argsort(keys, kind="stable")  # equal keys together, in their order
        k = keys[by_key]
        first = np.r_[True, k[1:] != k[:-1]]  # (K,) a new key in sorted order
        group = np.cumsum(first) - 1
        rank = np.empty(len(keys), np.int64)  # (K,) earlier takes of the same key in this call
        rank[by_key] = np.arange(len(keys)) - np.flatnonzero(first)[group]
        i = i0 + self.used[np.minimum(i0, len(self.sorted) - 1)] * (i0 < len(self.sorted)) + rank
        ok = i < len(self.sorted)
        ok[ok] = self.sorted[i[ok]] == keys[ok]
        np.add.at(self.used, i0[ok], 1)
        j = np.full(len(keys), -1, np.int64)
        j[ok] = self.order[i[ok]]
        self.taken[j[ok]] = True
        return j

    def left(self) -> list[int]:
        """Positions not taken, keys in order of their first row, then by position (the order a
        dict of keys to queues of rows gave)."""
        rest = np.flatnonzero(~self.taken)  # (L,)
        first = [int(self.order[self._first(self.keys[j].tobytes())]) for j in rest]
        return [int(j) for _, j in sorted(zip(first, rest.tolist()))]


class _Positions:
    """Store positions appended in ascending order, held as a range while they are consecutive (a
    new kb's plan: every row is new), else as an array: no 8 bytes a row for a new kb (issue 16)."""

    def __init__(self):
        self._range, self._array = range(0), None

    def append(self, p: int) -> None:
        if self._array is None and (not self._range or p == self._range.stop):
            self._range = range(p if not self._range else self._range.start, p + 1)
            return
        if self._array is None:
            self._array = array("q", self._range)
        self._array.append(p)

    def positions(self):
        return self._range if self._array is None else self._array


def _plan_unchanged(prev: Previous) -> Plan:
    """The plan of a repair: the kb's own references, nothing added or removed."""
    docs = {"added": 0, "changed": 0, "removed": 0, "kept": 0,
            "unchanged": len({d for c in refs_file.iter_columns(prev.rows, ("doc_id",)) for d in c["doc_id"]})}
    # the corpus was not read: the skips are the kb's, as its last compile counted them
    return Plan(prev.rows, [], [], docs, CorpusReport(skipped=Counter(prev.manifest.counts.get("skipped") or {})))


# ---- writing --------------------------------------------------------------------------------------

def _shard_metadata(setup: Setup) -> dict:
    return {"quant": setup.spec.quant, "model_config_sha256": setup.spec.model_config_sha256,
            "created_by": f"m3compile {__version__}"}


def _encode_frames(setup: Setup, token_lists: list[list[int]], timer: Timer) -> Frames:
    """(frame, relative error, max abs error, K) of each reference, encoded here and now."""
    return encode_frames(setup.ck.model, setup.spec, token_lists, timer)


def _engine(setup: Setup, batches: Iterable[list[list[int]]], timer: Timer) -> tuple[Iterator[Frames], int]:
    """The frames of each non-empty batch, in order, from the configured engine (distribute.py),
    and how many processes (or Ray actors) encode them; 1 is this process. Every engine takes the
    batches lazily from `batches`: the local one a batch at a time, worker processes a few per
    worker ahead, Ray three calls per actor ahead, so none holds the plan's token ids (issue 16)."""
    config = setup.config
    todo = (b for b in batches if b)
    workers = config.engine_workers
    if config.engine == "ray":
        return ray_frames(setup.ray, setup.model_path, setup.spec, todo, config.device, workers,
                          config.gpus_per_worker, config.cpus_per_worker), workers
    if workers > 1:
        return pool_frames(setup.model_path, setup.spec, todo, config.device, workers, config.cpus_per_worker), workers
    return local_frames(setup.ck.model, setup.spec, todo, timer), 1


def _batch_spans(config: CompileConfig, new) -> Iterator[tuple[int, int]]:
    """(start, end) of each forward pass's references in `new`, streamed (nothing held per batch):
    every --batch-size references, or by default as many as hold at most BATCH_TOKENS tokens (one
    at least). A memory does not depend on its batch (model.PackedRows), so this decides speed
    only: the forward packs a batch's real tokens into BATCH_TOKENS-row blocks, and a batch that
    fills one wastes no rows on padding."""
    if config.batch_size is not None:
        for s in range(0, len(new), config.batch_size):
            yield s, min(s + config.batch_size, len(new))
        return
    start, used, i = 0, 0, 0
    for c in refs_file.iter_columns(new, ("n_tokens",)):
        for n in c["n_tokens"].tolist():
            if used + n > BATCH_TOKENS and i > start:
                yield start, i
                start, used = i, 0
            used += n
            i += 1
    if i > start:
        yield start, i


def _write_new(out: Path, setup: Setup, prev: Previous, plan: Plan, timer: Timer, progress: Progress) -> dict:
    config = setup.config
    source = store.FrameSource(out, setup.spec)
    stats = {"encoded": 0, "copied": 0}
    checkpoints = store.Checkpoints(out, _shard_metadata(setup), config.checkpoint_seconds)
    with ShardWriter(out, _shard_metadata(setup), config.max_shard_bytes, first_index=prev.next_shard) as writer, \
            ExitStack() as stack, closing(source):
        writer.before_replace = source.move_aside
        stack.callback(checkpoints.discard)  # frames after the last checkpoint are in a shard, or lost with the run
        # what the engine encodes: the references whose frame no shard or checkpoint holds (one
        # byte a reference; a batch's rows exist as dicts only while it is written)
        sending = bytearray(b"\1") * len(plan.new)
        if source.frames:  # frames on disk (a resumed or incremental compile): looked up by key
            for lo in range(0, len(plan.new), refs_file.COLUMN_BLOCK):
                keys = plan.new[lo:lo + refs_file.COLUMN_BLOCK].keys()
                sending[lo:lo + len(keys)] = bytes(k.tobytes() not in source.frames for k in keys)
        lists = ([ids.tolist() for j, ids in enumerate(refs_file.columns(plan.new[s:e], ("token_ids",))["token_ids"])
                  if sending[s + j]] for s, e in _batch_spans(config, plan.new))
        encoded, stats["engine_workers"] = _engine(setup, lists, timer)
        # the driver's wait for frames encoded elsewhere (run.json); None: encoded here, timed by stage
        waiting = ("encode (waiting for ray)" if config.engine == "ray" else
                   "encode (waiting for workers)" if stats["engine_workers"] > 1 else None)
        stack.enter_context(closing(encoded))  # a failed write stops the engine (the Ray session closes in _run)
        for n, (s, e) in enumerate(_batch_spans(config, plan.new)):
            batch = list(plan.new[s:e])
            todo = [row for j, row in enumerate(batch) if sending[s + j]]
            sent_ids = {row["ref_id"] for row in todo}
            on_disk = {row["ref_id"]: source.get(bytes.fromhex(row["ref_key"])) for row in batch
                       if row["ref_id"] not in sent_ids}
            fresh = {}
            if todo:
                with timer(waiting) if waiting else nullcontext():
                    frames = next(encoded)
                fresh = {row["ref_id"]: e for row, e in zip(todo, frames)}
            damaged = [row for row in batch if row["ref_id"] not in sent_ids and on_disk[row["ref_id"]] is None]
            if damaged:  # a frame on disk that fails its check is never copied: encoded again here
                frames = _encode_frames(setup, [list(r["token_ids"]) for r in damaged], timer)
                fresh.update({row["ref_id"]: e for row, e in zip(damaged, frames)})
            if fresh:
                crash_point(f"encode:{n + 1}")
            with timer("write"):
                for j, row in enumerate(batch):
                    if row["ref_id"] in fresh:
                        frame, rel, mx, K = fresh[row["ref_id"]]
                        stats["encoded"] += 1
                    else:
                        frame, f, K = on_disk[row["ref_id"]]
                        rel, mx = f.rel_err, f.max_err
                        stats["copied"] += 1
                    n_shards = len(writer.shards)
                    loc = writer.add(row["ref_id"], frame, bytes.fromhex(row["ref_key"]), (rel, mx))
                    checkpoints.added(row["ref_id"], frame, bytes.fromhex(row["ref_key"]), (rel, mx))
                    if len(writer.shards) > n_shards:
                        checkpoints.shard_written()
                        crash_point("shard")
                    plan.new.locate(s + j, n_kept=K, shard=loc.shard, byte_offset=loc.byte_offset,
                                    byte_length=loc.byte_length, quant_rel_err=rel, quant_max_err=mx)
                checkpoints.tick()
            crash_point(f"batch:{n + 1}")
            progress({"event": "batch", "refs": len(batch), "tokens": sum(r["n_tokens"] for r in batch),
                      "bytes": sum(len(r["text"].encode("utf-8")) for r in batch)})
        with timer("write"):
            writer.close()
    stats["shards_written"] = writer.written
    stats["shards_kept"] = writer.kept
    return stats


def _repair_shards(out: Path, setup: Setup, prev: Previous, plan: Plan, timer: Timer, log) -> list[str]:
    """Rebuild, under its own name, every live shard whose bytes are not the manifest's: frames that
    still check are copied, the live references' other frames are encoded again (deterministic, so a
    fully recovered shard gets back its recorded bytes); a tombstoned frame that no longer checks is
    dropped. Rows of the rebuilt shards get their new locations. Healthy shards are not touched."""
    shards = sorted(s for s in prev.manifest.shards if s in prev.damaged) if prev.manifest else []
    if not shards:
        return []
    live = defaultdict(dict)
    where = {}  # ref_id -> what sets its row's new frame fields (plan.rows is columns or dicts)
    for j, r in enumerate(plan.rows):
        if r.get("shard") in shards:
            live[r["shard"]][r["ref_id"]] = r
            where[r["ref_id"]] = partial(plan.rows.locate, j) if isinstance(plan.rows, refs_file.Rows) else r.update
    for r in plan.removed:
        if r.get("shard") in shards:
            live[r["shard"]][r["ref_id"]] = r
            where[r["ref_id"]] = r.update
    for name in shards:
        path, rows = out / name, live[name]
        # the live rows are the authority on their frames (id, key, place, errors); the shard's own
        # index, which may be damaged too, only adds its tombstones
        expected = {i: (bytes.fromhex(r["ref_key"]), store.Frame(name, r["byte_offset"], r["byte_length"],
                                                                r["quant_rel_err"], r["quant_max_err"]))
                    for i, r in rows.items()}
        spans = {(f.offset, f.length) for _, f in expected.values()}
        try:
            index = store.shard_frames(path)
        except Exception:  # the index is unreadable: its tombstones are lost with it
            index = []
        for i, key, f in index:
            if i not in expected and (f.offset, f.length) not in spans:
                expected[i] = (key, f)
        frames, todo, mx = {}, [], setup.spec.max_payload()
        # a damaged header fails every frame's read (all re-encoded); a truncated shard gives up the
        # frames before its cut, each checked whole
        with ShardReaders(salvage=True) as readers:
            for ref_id, (key, f) in sorted(expected.items()):
                try:
                    data = readers.read(path, f.offset, f.length, ref_id)
                    check_frame(data, setup.spec.scheme, mx, name)
                    frames[ref_id] = (key, data, (f.rel_err, f.max_err))
                except (M3Error, OSError):
                    if ref_id in rows and "token_ids" in rows[ref_id]:
                        todo.append(ref_id)
                    else:
                        log(f"{name}: the tombstoned frame of reference {ref_id} is damaged and dropped")
        size = setup.config.refs_per_batch(setup.spec.width)
        for i in range(0, len(todo), size):
            ids = todo[i:i + size]
            for ref_id, (frame, rel, mx, _) in zip(ids, _encode_frames(setup, [list(rows[r]["token_ids"]) for r in ids],
                                                                      timer)):
                frames[ref_id] = (bytes.fromhex(rows[ref_id]["ref_key"]), frame, (rel, mx))
        lost = [i for i in rows if i not in frames]
        if lost:  # a recovered row whose tokens the corpus no longer has: it leaves with its frame
            raise M3Error(f"{name}: references {lost[:5]} are damaged and their texts are not in the corpus; "
                          "run `m3 compile CORPUS -o KB --rebuild` with the corpus they came from")
        # in place only where every live frame keeps its recorded place: until the new manifest is
        # committed (a kill in between, or an error for a later shard) the committed table reads the
        # shard at those places. Where frames move (a damaged tombstone dropped, or the tombstones of
        # an unreadable index unknown), the shard is written under a new name, and the damaged file
        # stays as it was until the commit removes it
        number, at = store.shard_number(name), 0
        for ref_id in sorted(frames):
            size = len(frames[ref_id][1])
            if ref_id in rows and (rows[ref_id]["byte_offset"], rows[ref_id]["byte_length"]) != (at, size):
                number, prev.next_shard = prev.next_shard, prev.next_shard + 1
                break
            at += size
        with timer("write"), ShardWriter(out, _shard_metadata(setup), store.NO_SHARD_LIMIT,
                                         first_index=number) as writer:
            for ref_id in sorted(frames):
                key, data, err = frames[ref_id]
                loc = writer.add(ref_id, data, key, err)
                if ref_id in rows:
                    where[ref_id](shard=loc.shard, byte_offset=loc.byte_offset, byte_length=loc.byte_length,
                                  quant_rel_err=float(err[0]), quant_max_err=float(err[1]))
        moved = "" if number == store.shard_number(name) else f" into {loc.shard} (its frames moved)"
        log(f"repaired {name}{moved}: {len(frames) - len(todo)} frames copied, {len(todo)} encoded again")
    return shards


def _build_generation(out: Path, setup: Setup, rows: list[dict], shards: list[str], timer: Timer,
                      reuse: "DenseReuse | None" = None) -> tuple[str, dict]:
    retrieval = {}

    def build(gen: Path):
        refs_file.write_references(gen / refs_file.FILE_NAME, rows)
        infos = [shard_info(out / s) for s in shards]
        meta = {**_shard_metadata(setup), "format": FORMAT, "format_version": str(FORMAT_VERSION), "codec": CODEC,
                "zstd_level": str(ZSTD_LEVEL), "layout": LAYOUT, "rope": "post", "shard_dir": ".."}
        write_shard_index(gen, infos, meta)
        (gen / mf.TOKENIZER).write_bytes((setup.ck.path / "tokenizer.json").read_bytes())
        with timer("index"):
            # each reference indexed after its document's title and scored with its document's
            # context (formats/index.md, version 2)
            retrieval.update(index_references(gen, rows, setup.config.embedder, setup.config.index_factory,
                                              setup.config.device, reuse)["retrieval"])
            dense = retrieval.get("dense")
            if dense and dense["embedder"].get("name") is None:  # a directory: recorded relative to the kb
                dense["embedder"]["path"] = relative_to_kb(dense["embedder"]["path"], out)

    with timer("write"):
        gen = store.write_generation(out, build)
    return gen, retrieval


def _dense_reuse(out: Path, setup: Setup, prev: Previous) -> "DenseReuse | None":
    """The previous generation's dense vectors for this compile to take back (index.DenseReuse),
    where the kb had a dense index and none of its generation's files is damaged."""
    m = prev.manifest
    if m is None or not setup.config.embedder or not (m.retrieval or {}).get("dense") or prev.rows_recovered \
            or not len(prev.rows):  # a rebuild embeds everything again
        return None
    gen = Path(m.generation)
    if any(gen in Path(name).parents for name in prev.damaged) or not (out / gen).is_dir():
        return None
    return DenseReuse(out / gen, m.retrieval, prev.rows)


def _model_record(setup: Setup, out: Path) -> dict:
    a, config = setup.ck.args, setup.config
    path = relative_to_kb(config.model, out) if config.model is not None else "<embedded example>"
    return {"path": path, **setup.model_id, "n_layers": a.n_layers, "n_kv_heads": a.n_kv_heads,
            "n_heads": a.n_heads, "head_dim": a.head_dim, "dtype": config.dtype}


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise M3Error(f"output {out} is a file; give a directory path for the knowledge base")
    if out.is_dir():
        # hidden files not of a kb (a `.git`, a `.DS_Store`) are left where they are, never removed
        foreign = sorted(p.name for p in out.iterdir() if not store.is_kb_entry(p.name) and not p.name.startswith("."))
        if foreign:
            raise M3Error(f"output directory {out} holds files that are not part of a knowledge base "
                          f"({', '.join(foreign[:3])}); give a new or empty directory, or an existing kb")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise M3Error(f"cannot create the kb directory {out}: {e.strerror or e}; choose a writable path") from None


@dataclass
class CompileResult:
    manifest: mf.Manifest
    summary: dict  # what this run did: documents added/changed/..., references encoded/copied/reused/removed


def compile_kb(config: CompileConfig, out_dir: str | Path, progress: Progress | None = None,
               log: Callable[[str], None] = lambda s: None, keep_missing: bool = False,
               rebuild: bool = False, retrain_codebooks: bool = False) -> CompileResult:
    """Compile `config.corpus` into the knowledge base at `out_dir`, incrementally if one is there.

    Args:
        config: every compile setting (see CompileConfig).
        out_dir: a new or empty directory, or a kb compiled with the same model and memory settings.
            A damaged kb is repaired on the way (damaged shards rebuilt, healthy ones untouched).
        progress: called with {"event": "start", "total_bytes"}, {"event": "batch", "refs",
            "tokens", "bytes"} and {"event": "done"}.
        log: receives human-readable notes (which model, skipped files, what changed or was repaired).
        keep_missing: keep the references of documents absent from this corpus (add-only).
        rebuild: compile anew even if the kb was made with other settings or cannot be read.
        retrain_codebooks: vq: train new codebooks instead of keeping the kb's (re-encodes everything).
    Returns:
        CompileResult with the manifest (also written to out_dir/manifest.json) and a summary.
    Example:
        >>> compile_kb(CompileConfig(corpus="examples/corpus"), "kb/").manifest.counts["references"]
    """
    config = _with_kb_defaults(config, Path(out_dir), log, rebuild)
    if retrain_codebooks and not config.quant.startswith("vq"):
        raise M3Error(f"--retrain-codebooks trains the codebooks of a vq kb, and this compile's is --quant "
                      f"{config.quant}: drop it (or give --quant vq, with --rebuild for an existing kb)")
    return _run(config, Path(out_dir), progress or (lambda e: None), log, keep_missing, rebuild, repair_only=False,
                retrain_codebooks=retrain_codebooks)


def repair_kb(kb_dir: str | Path, model: str | Path | None = None, device: str = "cpu",
              log: Callable[[str], None] = lambda s: None) -> CompileResult:
    """Restore a kb whose files `m3 verify` faults, from its own frames, its model and, only if its
    references table is lost, its corpus (the path its manifest records). Healthy shards are not
    touched; a kb with nothing damaged is left byte for byte as it was.

    Args:
        kb_dir: the knowledge base.
        model: the checkpoint it was compiled with (default: the path its manifest records).
        device: torch device for the frames that must be encoded again.
        log: receives what was damaged and what was rebuilt.
    Returns:
        CompileResult with the committed manifest and a summary.
    Example:
        >>> repair_kb("kb/").summary["repaired"]
        ['memory-00001.safetensors']
    """
    kb = Path(kb_dir)
    manifest = mf.read_manifest(kb)
    # the manifest's settings are complete (memory_layers null = the first half): nothing to adopt
    c = {**_recorded_config(manifest), "device": device, "model_memory": False}
    c["corpus"] = str(kb / c["corpus"]) if not Path(c["corpus"]).is_absolute() else c["corpus"]
    if model is not None:
        c["model"] = str(model)
    elif c.get("model") is not None and not Path(c["model"]).is_absolute():
        c["model"] = str(kb / c["model"])
    if c.get("embedder") and (kb / c["embedder"]).exists():
        c["embedder"] = str(kb / c["embedder"])
    return _run(CompileConfig.from_dict(c), kb, lambda e: None, log, keep_missing=False, rebuild=False,
                repair_only=True)


def kb_settings(out: str | Path) -> dict:
    """The compile settings the kb at `out` records (manifest "config"), or {} where there is no
    readable kb: what `m3 compile` takes for the options a user leaves out when growing one."""
    try:
        m = mf.read_manifest(Path(out))
    except M3Error:
        return {}
    return _recorded_config(m)


def _recorded_config(m: "mf.Manifest") -> dict:
    """The manifest's `config`, with a recorded `--quant vq` that no longer names the kb's preset (`vq`
    is whichever preset is the default when it runs) replaced by the preset it resolved to (its
    `quant.scheme`). Where `vq` still names it, the record stays `vq`: a kb built with `--quant vq`
    stays up to date for `--check` with or without it."""
    config = dict(m.config)
    scheme = m.quant.get("scheme")
    if config.get("quant") == "vq" and isinstance(scheme, str) and scheme != "vq":
        from m3compile.vq import default_preset

        if default_preset() != scheme:
            config["quant"] = scheme
    return config


def _with_kb_defaults(config: CompileConfig, out: Path, log, rebuild: bool = False) -> CompileConfig:
    """What compile_kb and check_kb start from: the corpus checked, and every setting left out taken
    from the kb at `out` (its model, then its quantizer, dtype, codebook settings and embedder; a
    rebuild takes the embedded model where the kb's is gone), its manifest read once."""
    if not Path(config.corpus).exists():
        raise M3Error(f"corpus {config.corpus} does not exist; pass an existing directory or file")
    recorded = kb_settings(out)
    if config.model is None:  # growing the kb, or rebuilding it: its model unless another is given
        config = _kb_model_as_default(config, out, log, required=not rebuild, recorded=recorded)
    return with_kb_settings(config, out, log, recorded)


def with_kb_settings(config: CompileConfig, out: str | Path, log: Callable[[str], None] = lambda s: None,
                     recorded: dict | None = None) -> CompileConfig:
    """`config` with each kb setting left unset (None: quant, dtype, codebook_sample, codebook_seed,
    embedder, index_factory) filled from the kb at `out` when there is one, else from KB_DEFAULTS;
    `embedder="none"` means no dense index. Growing or rebuilding a kb thus keeps its format and its
    dense index unless an option says otherwise, from Python as from `m3 compile` (before, only the
    CLI did this, and `compile_kb` dropped a hybrid kb's dense index). Says what it took from the kb
    where that differs from the default. `recorded`: kb_settings(out), where the caller read it."""
    out = Path(out)
    unset = {k for k in KB_DEFAULTS if getattr(config, k) is None}
    if recorded is None:
        recorded = kb_settings(out) if unset else {}
    fill = {}
    for name in ("quant", "dtype", "codebook_sample", "codebook_seed"):
        if name in unset:
            fill[name] = recorded.get(name, KB_DEFAULTS[name])  # codebook_*: recorded by vq kbs only
            if fill[name] != KB_DEFAULTS[name]:
                log(f"no --{name.replace('_', '-')} given: using the kb's, {fill[name]}")
    rec_embedder = recorded.get("embedder")  # a directory relative to the kb, or a name (minilm)
    if "embedder" in unset and rec_embedder:
        fill["embedder"] = str(out / rec_embedder) if (out / rec_embedder).exists() else rec_embedder
    elif config.embedder in ("", "none"):
        fill["embedder"] = None
    embedder = fill.get("embedder", config.embedder)
    if "index_factory" in unset:
        # the kb's index type goes with the kb's embedder, given again or not
        same = embedder is not None and relative_to_kb(embedder, out) == rec_embedder
        fill["index_factory"] = (recorded.get("index_factory") if same else None) or KB_DEFAULTS["index_factory"]
    elif embedder is None and config.index_factory != KB_DEFAULTS["index_factory"]:
        raise M3Error(f"--index-factory {config.index_factory!r} shapes the dense index, which only --embedder "
                      "builds; add --embedder (e.g. minilm) or drop --index-factory")
    if "embedder" in unset and rec_embedder:
        log(f"no --embedder given: using the kb's, {rec_embedder} ({fill['index_factory']}); --embedder none "
            "drops the dense index")
    return replace(config, **fill)


def _kb_model_as_default(config: CompileConfig, out: Path, log, required: bool, recorded: dict) -> CompileConfig:
    """Growing a kb without --model uses the checkpoint the kb was compiled with, as generate,
    eval and verify do; the embedded model is the default only for a new kb (or one whose model is
    it). A kb whose manifest cannot be read is left to the compile, which names what is wrong.
    `recorded`: kb_settings(out)."""
    recorded = recorded.get("model")  # as manifest "model.path", but null for the embedded model
    if recorded is None:
        return config
    # recorded relative to the kb directory (older kbs: as given)
    path = next((p for p in (out / recorded, Path(recorded)) if p.is_dir()), None)
    if path is None and not required:  # --rebuild: the kb is compiled anew, with the default model
        log(f"note: {out} was compiled with the model {recorded!r}, which is not found from here; --rebuild "
            "compiles it with the embedded model (pass --model to choose another)")
        return config
    if path is None:
        raise M3Error(f"{out} was compiled with the model {recorded!r}, which is not found from here; pass "
                      "--model with that checkpoint (or --rebuild to compile the kb anew with another)")
    log(f"no --model given: using the model {out} was compiled with, {path}")
    return replace(config, model=str(path))


def _run(config: CompileConfig, out: Path, progress: Progress, log, keep_missing: bool, rebuild: bool,
         repair_only: bool, retrain_codebooks: bool = False) -> CompileResult:
    created = not out.exists()
    _prepare_out_dir(out)
    try:
        return _run_in(config, out, progress, log, keep_missing, rebuild, repair_only, retrain_codebooks)
    except BaseException:
        if created:  # a compile that failed before writing anything leaves no empty kb directory behind
            with suppress(OSError):
                out.rmdir()  # only if empty: finished shards and checkpoints stay for the rerun
        raise


def _run_in(config: CompileConfig, out: Path, progress: Progress, log, keep_missing: bool, rebuild: bool,
            repair_only: bool, retrain_codebooks: bool) -> CompileResult:
    t_start = time.time()
    with store.KbLock(out, log), ExitStack() as engine:
        store.remove_temporaries(out)
        # a rebuild writes a new kb: a width only an old kb may keep is refused (it could not be read)
        setup, timer = _setup(config, log, None if rebuild else out)
        config = setup.config  # resolved: every memory setting set
        noted = False  # _note_encoding said its notes
        if config.engine == "ray":  # one cluster for cutting and encoding, started when first needed
            setup.ray = engine.enter_context(closing(RaySession(config.ray_address)))
        if setup.spec.quant.startswith("vq"):
            # an incremental compile keeps the kb's codebooks; new ones are trained for a new kb, or
            # when asked (a rebuild, --retrain-codebooks). A kb of other settings is left to
            # _previous, which refuses it by name like any other
            frozen = None if retrain_codebooks else _frozen_codebooks(out, setup.spec)
            has_kb = (out / mf.FILE_NAME).is_file()
            if frozen is not None:
                codebooks_kept, entry, recorded = frozen
                _use_codebooks(setup, codebooks_kept, entry)
                config = _keep_codebook_settings(setup, recorded, log)
            elif not has_kb or rebuild or retrain_codebooks:
                _note_encoding(config, log)
                noted = True
                setup.ck.model  # loaded first: a model that does not load fails before the sample is cut
                _use_codebooks(setup, *_train_codebooks(out, setup, timer, log))
                rebuild = rebuild or has_kb  # new codebooks: every memory is written anew
        prev = _previous(out, setup, rebuild, log, spill_dir=out, quick=not repair_only)
        if prev.up_to_date is not None:  # nothing to do: nothing is read of the rows, nothing written
            docs, report = prev.up_to_date
            progress({"event": "start", "total_bytes": corpus_bytes(Path(config.corpus))})
            return _nothing_to_do(prev, docs, report, prev.manifest.counts["references"], [], progress, log)
        if not noted:
            _note_encoding(config, log)
        if config.engine == "local" and config.engine_workers == 1:
            # the weights this process encodes with, loaded now: a model that does not load fails
            # before the corpus is cut. Worker processes and Ray actors load their own (and check
            # their sha256), so with them this process loads the model only to train codebooks or
            # repair a shard, and a driver needs no GPU for --device cuda
            setup.ck.model
        setup.ck.check_unchanged()  # the files are the ones fingerprinted above
        cut = not (repair_only and not prev.rows_recovered)  # this run cuts the corpus (run.json's tokenizers)
        if not cut:
            plan = _plan_unchanged(prev)
        else:
            progress({"event": "start", "total_bytes": corpus_bytes(Path(config.corpus))})
            if repair_only and not Path(config.corpus).exists():
                raise M3Error(f"the references table of {out} is damaged and its corpus {config.corpus} is not "
                              "there to recover it; run `m3 compile CORPUS -o KB --rebuild`")
            plan = _plan(setup, prev, keep_missing, timer, spill_dir=out)
        try:
            # a rebuild writes every memory into new shards: the old ones, damaged or not, are garbage
            repaired = [] if rebuild else _repair_shards(out, setup, prev, plan, timer, log)
            if repaired:  # a shard rebuilt to its recorded bytes is damaged no more
                again = store.damaged_files(out, {s: prev.manifest.files[s] for s in repaired})
                prev.damaged = {k: v for k, v in prev.damaged.items() if k not in repaired or k in again}
            if _unchanged(setup, prev, plan, out):
                # nothing would change: no shard, generation or manifest is written (CI rebuilds)
                if cut and prev.tokenizers != tokenizers.__version__:
                    # every document was cut again by this library into the kb's rows: say so in
                    # run.json, so that the next compile gives them back uncut (and _up_to_date holds)
                    run = _run_log(out)
                    if run:
                        mf.atomic_write_text(out / mf.RUN_LOG, mf.to_json({**run, "tokenizers": tokenizers.__version__}))
                return _nothing_to_do(prev, plan.docs, plan.report, len(plan.rows), repaired, progress, log)
            stats = _write_new(out, setup, prev, plan, timer, progress)
            engine.close()  # the last Ray work is done: a cluster this compile started stops now
            shards = store.shard_state(out, plan.rows)
            reuse = _dense_reuse(out, setup, prev)
            gen, retrieval = _build_generation(out, setup, plan.rows, sorted(shards), timer, reuse)
            crash_point("generation")
            next_id = max([prev.next_ref_id] + [int(np.max(c["ref_id"])) + 1
                                                for c in refs_file.iter_columns(plan.rows, ("ref_id",))])
            # the corpus order _up_to_date compares, committed with the rows; a repair's rows are the
            # kb's own: its value stays
            order = plan.corpus_order if plan.corpus_order is not None else prev.manifest.state.get("corpus_order")
            state = {"corpus_order": order} if order else {}
            manifest = mf.build_manifest(out, setup.spec, config_record(config, out), _model_record(setup, out),
                                         plan.rows, gen, retrieval, shards, plan.report.skipped, next_id, setup.vq,
                                         prev.checked, state)
            summary = {"documents": plan.docs, "references": {"encoded": stats["encoded"], "copied": stats["copied"],
                                                              "reused": len(plan.rows) - len(plan.new),
                                                              "removed": len(plan.removed)},
                       # kept: the kb's shards this compile did not write (the previous kb's, and one a
                       # resumed compile found already there whole), as the no-change path reports them
                       "shards_written": stats["shards_written"],
                       "shards_kept": sorted(set(shards) - set(stats["shards_written"])),
                       "repaired": repaired, "engine_workers": stats["engine_workers"],
                       **({"dense_vectors_reused": reuse.taken} if reuse is not None else {}),
                       **_drift(setup, plan, log)}
            import torch

            from m3compile.model import cpu_description

            run = {"created_at_unix": round(t_start, 3), "wall_seconds": round(time.time() - t_start, 3),
                   "stage_seconds": {k: round(v, 4) for k, v in sorted(timer.seconds.items())},
                   "summary": summary, "host": socket.gethostname(), "cpu": cpu_description(),
                   "python": platform.python_version(),
                   "torch": torch.__version__,
                   # the library that cut the rows: this one, unless a repair cut nothing (then the kb's)
                   "tokenizers": tokenizers.__version__ if cut else prev.tokenizers,
                   "threads": torch.get_num_threads(),
                   **{k: v for k, v in config.to_dict().items() if k in RUN_SETTINGS},
                   **({} if config.batch_size else {"batch_tokens": BATCH_TOKENS})}
            mf.commit(out, manifest, before_replace=lambda: crash_point("commit"))
            # after the commit: run.json's `tokenizers` vouches for the rows' cut (_previous_documents,
            # _up_to_date), so it never names a library before the rows it cut are committed; a kill
            # in between leaves the last compile's run.json, which only costs the next one a re-cut
            mf.atomic_write_text(out / mf.RUN_LOG, mf.to_json(run))
        except OSError as e:
            raise M3Error(f"cannot write to {out} ({e.strerror or e}{': ' + e.filename if e.filename else ''}); "
                          "the kb as last committed is intact: free space or fix permissions and run the same "
                          "command again (finished shards are kept)") from None
        finally:
            _close_spills(prev.rows, plan.rows)
    plan.report.log_skips(log)
    progress({"event": "done"})
    return CompileResult(manifest, summary)


def _nothing_to_do(prev: Previous, docs: dict, report: CorpusReport, reused: int, repaired: list[str], progress,
                   log) -> CompileResult:
    """The result of a compile that changes nothing (the kb as it is; repaired shards, if any)."""
    report.log_skips(log)
    progress({"event": "done"})
    return CompileResult(prev.manifest, {"documents": docs, "references": {
        "encoded": 0, "copied": 0, "reused": reused, "removed": 0}, "shards_written": [],
        "shards_kept": sorted(prev.manifest.shards), "repaired": repaired, "up_to_date": True})


def _drift(setup: Setup, plan: Plan, log) -> dict:
    """vq: how the references encoded now fare with the kb's codebooks, against their training sample."""
    if setup.vq is None or not plan.new:
        return {}
    new = sum(float(np.sum(c["quant_rel_err"])) for c in refs_file.iter_columns(plan.new, ("quant_rel_err",))) \
        / len(plan.new)
    base = setup.vq["train_rel_err_mean"]
    # a training sample the codebooks reproduce exactly (vq:Flat, as many centroids as vectors) has no
    # ratio: null in run.json, not the non-JSON Infinity
    ratio = new / base if base > 0 else None
    log(f"codebook drift: the {len(plan.new)} references written now have relative error {new:.4f}, the codebooks' "
        f"training sample {base:.4f}" + (f" (x{ratio:.2f})" if ratio is not None else "")
        + ("; --retrain-codebooks trains new ones" if ratio is not None and ratio > 1.2 else ""))
    return {"codebook_drift": {"references": len(plan.new), "rel_err_mean": new, "train_rel_err_mean": base,
                               "ratio": ratio}}


def _unchanged(setup: Setup, prev: Previous, plan: Plan, out: Path) -> bool:
    if prev.manifest is None or prev.damaged or prev.rows_recovered or plan.new or plan.removed \
            or plan.rows != prev.rows:
        return False
    return config_record(setup.config, out) == prev.manifest.config \
        and prev.manifest.created_by == f"m3compile {__version__}"


def check_kb(config: CompileConfig, out_dir: str | Path, keep_missing: bool = False,
             log: Callable[[str], None] = lambda s: None) -> list[str]:
    """What a compile of `config` into `out_dir` would change; [] when the kb is up to date. Writes nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise M3Error(f"output {out} is a file; give the kb directory to check")
    config = _with_kb_defaults(config, out, log)
    # settings the compile would refuse (a model that is not there, an --index-factory without an
    # --embedder, a bad vq factory, a width past the model's positions) are errors, not "out of
    # date", with no kb too: the same checks as a compile's (the weights are fingerprinted, not loaded)
    setup, timer = _setup(config, log, out)
    if not (out / mf.FILE_NAME).exists():
        return [f"{out} holds no knowledge base: everything would be compiled"]
    frozen = _frozen_codebooks(out, setup.spec) if setup.spec.quant.startswith("vq") else None
    if frozen is not None:
        codebooks_kept, entry, recorded = frozen
        _use_codebooks(setup, codebooks_kept, entry)
        _keep_codebook_settings(setup, recorded, log)
    # a kb the compile would refuse (other settings, an unreadable manifest) is an error, not a change:
    # `m3 compile --check` exits 2 on it, as the compile would fail
    prev = _previous(out, setup, rebuild=False, log=lambda s: None, spill_dir=Path(tempfile.gettempdir()),
                     quick=True)
    if prev.up_to_date is not None:
        return []
    # --check writes nothing in the kb: its spill files go to the system's temporary directory
    plan = _plan(setup, prev, keep_missing, timer, spill_dir=Path(tempfile.gettempdir()))
    changes = [f"damaged {name}: {why}" for name, why in prev.damaged.items()]
    old_config, new_config = prev.manifest.config, config_record(setup.config, out)
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
    _close_spills(prev.rows, plan.rows)
    return changes


def _close_spills(*rows) -> None:
    """Close the spill files of these rows' stores (refs_file.RefColumns), once their last read is done."""
    for r in rows:
        if isinstance(r, refs_file.Rows):
            r.store.close()
