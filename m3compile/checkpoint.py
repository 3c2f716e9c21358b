"""A Hugging Face checkpoint directory read without torch: its config.json as ModelArgs, its weight
files, and its identity (fingerprint).

A departure from STYLE rule 2 ("the model is one file"), said here as the rule asks: a compile into a
kb that is already up to date, and `m3 compile --check` in CI, need the model's shape and identity
but never its weights. Importing torch was ~1.1 s of a 1.7 s check, and loading weights stored in
another dtype than the compute dtype (a bf16 checkpoint compiled in float32, the default) converted
them whole: 5.5 GB of RAM for a 0.89B model, for a check that encodes nothing. model.py holds the
modules and the loader, and imports ModelArgs from here, so `from m3compile.model import ModelArgs`
still works.
"""

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from m3compile.errors import M3Error
from m3compile.store import file_stamp, sha256_file

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


MAX_SIZE = 1 << 24  # the largest size or count a config.json may give (16.7M: 100x the largest models')


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int  # tokens in the embedding table
    dim: int  # model (residual) width C
    n_layers: int  # transformer blocks
    n_heads: int  # query heads N
    n_kv_heads: int  # key-value heads H; N % H == 0 (grouped-query attention)
    head_dim: int  # D, may differ from dim // n_heads (Mistral/Qwen explicit head_dim)
    hidden_dim: int  # FFN width F of the SwiGLU MLP
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 2048  # max_position_embeddings, informative: longer inputs still run
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: always; Llama: attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama mlp_bias)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix
    rope_scaling: tuple | None = None  # None or sorted (key, value) pairs of a llama3 scaling dict
    sliding_window: int | None = None  # active sliding-window span in tokens, None when full attention
    architecture: str = "LlamaForCausalLM"  # one of SUPPORTED_ARCHITECTURES

    @property
    def span(self) -> tuple[int, str]:
        """(positions a forward may span, the config.json key that says so): max_position_embeddings,
        or an active sliding window where that is shorter (the runtime refuses a longer span)."""
        if self.sliding_window is not None and self.sliding_window < self.max_seq_len:
            return self.sliding_window, "sliding_window"
        return self.max_seq_len, "max_position_embeddings"

    def __post_init__(self):
        # whole numbers in a sane range before any allocation: a head_dim of 1e10 asked torch for
        # 40 GB of RoPE frequencies, a billion layers built a billion blocks, 64.0 failed in nn.Linear
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                 "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                 "head_dim": self.head_dim, "intermediate_size": self.hidden_dim,
                 "max_position_embeddings": self.max_seq_len}
        for name, v in sizes.items():
            top = MAX_SIZE if name != "max_position_embeddings" else 1 << 40  # informative: nothing sized by it
            if type(v) is not int or not 1 <= v <= top:
                raise M3Error(f"config.json {name} = {v!r}: a size is a whole number from 1 to {top:,}; "
                              "fix config.json")
        if self.head_dim % 2:
            raise M3Error(f"config.json head_dim = {self.head_dim}: RoPE rotates pairs of dimensions, so a head "
                          "dim is even; fix config.json")
        for name, v in (("rms_norm_eps", self.norm_eps), ("rope_theta", self.rope_theta)):
            if type(v) not in (int, float) or not 0 < v < math.inf:
                raise M3Error(f"config.json {name} = {v!r} must be a positive finite number; fix config.json")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):
            raise M3Error(f"config.json sliding_window = {self.sliding_window!r} must be a whole number of tokens "
                          "(or null); fix config.json")
        if min(self.n_heads, self.n_kv_heads, self.dim, self.n_layers, self.vocab_size) < 1 \
                or self.n_heads % self.n_kv_heads:
            raise M3Error(f"model config: {self.n_heads} attention heads, {self.n_kv_heads} key-value heads, "
                          f"width {self.dim}, {self.n_layers} layers, vocabulary {self.vocab_size}: the heads must "
                          "be a multiple of the key-value heads and every size at least 1; fix config.json")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a transformers `config.json` dict; refuse anything this runtime does not compute."""
        if not isinstance(cfg, dict):
            raise M3Error(f"config.json holds a JSON {type(cfg).__name__}, not an object; give a Hugging Face "
                          "checkpoint's config.json")
        try:
            return cls._from_hf_config(cfg)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a key missing, a value of the wrong type
            what = f"lacks {e.args[0]!r}" if isinstance(e, KeyError) else f"has a value of the wrong type ({e})"
            raise M3Error(f"config.json {what}; give a complete Hugging Face checkpoint config.json") from None
        except ZeroDivisionError:  # the head dim from hidden_size / 0 heads, before the sizes are checked
            raise M3Error(f"config.json has num_attention_heads {cfg.get('num_attention_heads')!r}: a model has "
                          "at least one attention head; fix config.json") from None

    @classmethod
    def _from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise M3Error(
                f"unsupported architecture {archs or cfg.get('model_type')!r}: m3compile runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; use a checkpoint of one of those"
            )
        arch = archs[0]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise M3Error(f"unsupported hidden_act {act!r}: m3compile runs SwiGLU (silu) MLPs only")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise M3Error("unsupported partial_rotary_factor: m3compile rotates the whole head dim")
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or dim // n_heads
        if not cfg.get("head_dim") and type(dim) is type(n_heads) is int and n_heads > 0 \
                and (dim % n_heads or head_dim % 2):  # the size check below would name a head_dim not in the file
            raise M3Error(f"config.json hidden_size {dim} / num_attention_heads {n_heads} gives no even whole head "
                          "dim (RoPE rotates pairs of dimensions); fix config.json (or give head_dim)")
        theta, scaling = _rope_config(cfg)
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias, mlp_bias = True, False, False
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
            if window is not None and "sliding_attention" not in (cfg.get("layer_types") or ["sliding_attention"]):
                window = None
        else:
            qkv_bias = o_bias = _flag(cfg, "attention_bias")
            mlp_bias = _flag(cfg, "mlp_bias")
            # transformers' MistralConfig defaults a missing sliding_window to 4096 (null = none)
            window = cfg.get("sliding_window", 4096) if arch == "MistralForCausalLM" else None
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=_flag(cfg, "tie_word_embeddings"),
            rope_scaling=scaling,
            sliding_window=window,
            architecture=arch,
        )

    def to_hf_config(self, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
        """The transformers `config.json` of these args, such that from_hf_config reads back the same
        args; refuses (M3Error) what transformers' class for `architecture` cannot express."""
        arch = self.architecture
        assert arch in SUPPORTED_ARCHITECTURES, arch
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        if biases not in _HF_BIASES[arch]:
            fits = [a for a, allowed in _HF_BIASES.items() if biases in allowed]
            raise M3Error(
                f"cannot write a {arch} with biases q/k/v={self.qkv_bias}, o={self.o_bias}, "
                f"mlp={self.mlp_bias}: transformers' {arch} has no such layout; "
                + (f"save it as {' or '.join(fits)}" if fits else "no supported architecture has it")
            )
        if arch == "LlamaForCausalLM" and self.sliding_window is not None:
            raise M3Error(f"cannot write a LlamaForCausalLM with sliding window {self.sliding_window}: "
                          "Llama has none; save it as MistralForCausalLM or Qwen2ForCausalLM")
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
        cfg = {
            "architectures": [arch],
            "model_type": _HF_MODEL_TYPES[arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            # Qwen2Config has no head_dim field, but its modeling code reads one when present
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": "float32",
        }
        if self.rope_scaling:  # the same scaling where transformers <5 reads it (it ignores rope_parameters)
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if arch == "LlamaForCausalLM":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif arch == "MistralForCausalLM":
            # written even when null: MistralConfig defaults an absent key to 4096
            cfg.update(sliding_window=self.sliding_window)
        else:
            # the runtime never attends past the window, so which layers slide is unobservable to
            # it; when a window is active every layer gets it, like max_window_layers = 0
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            cfg.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                       max_window_layers=0 if self.sliding_window is not None else self.n_layers,
                       layer_types=[kind] * self.n_layers)
        return cfg


# what transformers' modeling code of each architecture hard-wires: allowed (qkv_bias, o_bias, mlp_bias);
# Llama's attention_bias switches q/k/v/o together, Qwen2 always has q/k/v biases, Mistral none
_HF_BIASES = {
    "LlamaForCausalLM": {(a, a, m) for a in (False, True) for m in (False, True)},
    "MistralForCausalLM": {(False, False, False)},
    "Qwen2ForCausalLM": {(True, False, False)},
}
_HF_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _flag(cfg: dict, name: str) -> bool:
    """A true/false setting of config.json (absent: false); "false" as a string was true (bool("false"))."""
    v = cfg.get(name, False)
    if not isinstance(v, bool):
        raise M3Error(f"config.json {name} = {v!r} must be true or false; fix config.json")
    return v


def _rope_config(cfg: dict) -> tuple[float, tuple | None]:
    # transformers <5 writes rope_theta + rope_scaling; >=5 writes rope_parameters with both inside.
    # Where both are there (save_checkpoint writes a llama3 scaling as both), every transformers
    # version reads rope_scaling (5: a non-empty rope_scaling wins; 4 knows no rope_parameters), its
    # theta the top-level rope_theta: so does this (it read rope_parameters first before)
    scaling, parameters = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    params = scaling or parameters or {}
    for name, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value is not None and not isinstance(value, dict):
            raise M3Error(f"config.json {name} {value!r} is not an object; fix config.json")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", (parameters or {}).get("rope_theta", 10000.0))))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise M3Error(
            f"unsupported rope scaling type {rope_type!r}: m3compile computes "
            f"{' and '.join(SUPPORTED_ROPE_TYPES)} RoPE only"
        )
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise M3Error(f"llama3 rope scaling lacks {', '.join(missing)} in config.json; fix the config")
    for k in keys:
        if type(params[k]) not in (int, float) or not 0 < params[k] < math.inf:
            raise M3Error(f"llama3 rope scaling {k} = {params[k]!r} must be a positive number; fix config.json")
    if params["high_freq_factor"] <= params["low_freq_factor"]:  # a division by their difference
        raise M3Error(f"llama3 rope scaling high_freq_factor {params['high_freq_factor']} must exceed "
                      f"low_freq_factor {params['low_freq_factor']}; fix config.json")
    return theta, tuple(sorted([("rope_type", "llama3")] + [(k, params[k]) for k in keys]))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, through the shard index when there is one."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():  # beside a stale index, the file transformers loads too
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise M3Error(f"cannot read {index}: {e!r}; fix or re-save the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise M3Error(f"{index}: weight_map is not an object of tensor name -> shard file name; fix or "
                          "re-save the checkpoint")
        for name in set(weight_map.values()):
            # plain file names beside the index (checked as text: the Hugging Face cache's shards are
            # symlinks into ../../blobs, and a name may not reach another directory)
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise M3Error(f"{index} names the shard {name!r}, not a file beside it; fix or re-save the "
                              "checkpoint")
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        hint = " (found PyTorch .bin weights: re-save with safe_serialization=True)" if any(path.glob("*.bin")) else ""
        raise M3Error(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")
    for f in files:
        if not f.is_file():
            raise M3Error(f"weight shard {f.name} named by the index is missing from {path}")
    return files


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not path.is_dir():
        hint = "; a llama2.c .bin converts with `m3 convert-llama2c`" if path.suffix == ".bin" else ""
        raise M3Error(f"model path {path} is not a directory; give a Hugging Face checkpoint directory{hint}")
    if not cfg_path.is_file():
        hint = "; llama2.c .bin files convert with `m3 convert-llama2c`" if any(path.glob("*.bin")) else ""
        raise M3Error(f"no config.json in {path}; give a Hugging Face checkpoint directory{hint}")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise M3Error(f"cannot parse {cfg_path}: {type(e).__name__}: {e}; fix or replace the file") from None


HASH_CACHE_MIN_BYTES = 64 << 20  # weight files at least this large have their sha256 remembered
HASH_CACHE_ENTRIES = 256  # files remembered per machine, the most recently hashed
HASH_CACHE_RACY_NS = 2 * 10**9  # a file changed this recently is not remembered (coarse timestamps)


def hash_cache_file() -> Path | None:
    """Where weight digests are remembered: $M3_CACHE_DIR, else $XDG_CACHE_HOME/m3compile, else
    ~/.cache/m3compile; sha256-cache.json there. None without any of them (no home directory)."""
    root = os.environ.get("M3_CACHE_DIR")
    if not root:
        home = os.path.expanduser("~")
        base = os.environ.get("XDG_CACHE_HOME") or (None if home.startswith("~") else os.path.join(home, ".cache"))
        if base is None:
            return None
        root = os.path.join(base, "m3compile")
    return Path(root) / "sha256-cache.json"


def sha256_weights(path: Path) -> str:
    """sha256 of a weight file, remembered on this machine while the file is unchanged.

    Every compile fingerprints its model; hashing a 110M checkpoint in float32 (500 MB, in the
    page cache) took 0.34 s of a 15 s compile, so a 16 GB one would take ~11 s of every run
    (estimated at that rate, not measured). A file of HASH_CACHE_MIN_BYTES or more is hashed once
    and its digest kept with its stamp (store.file_stamp: size, mtime, inode, device, ctime):
    rewriting the file, even with its mtime restored, changes its ctime, which no user call can set
    back; a copy is another inode. As with make or git's index, a change that leaves all five equal (bit rot
    under the file system) goes unseen: M3_HASH_CACHE=0 hashes every time, and `m3 verify` still
    reads every byte of a kb's own files. An unreadable or unwritable cache is ignored.
    """
    st, cache = path.stat(), hash_cache_file()
    if st.st_size < HASH_CACHE_MIN_BYTES or os.environ.get("M3_HASH_CACHE", "1") == "0" or cache is None:
        return sha256_file(path)
    stamp = list(file_stamp(st))  # as JSON keeps it
    key = str(path.resolve())
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError, RecursionError):
        entries = {}
    kept = entries.get(key)
    if (isinstance(kept, dict) and kept.get("stat") == stamp and isinstance(kept.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", kept["sha256"])):
        return kept["sha256"]
    digest = sha256_file(path)
    # remembered only if not written meanwhile, nor so recently that a file system with coarse
    # timestamps could give its next rewrite the same ones (git's "racy" entries)
    recent = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < HASH_CACHE_RACY_NS
    if not recent and list(file_stamp(path.stat())) == stamp:
        entries.pop(key, None)
        entries[key] = {"stat": stamp, "sha256": digest}  # the newest last; the oldest dropped first
        entries = dict(list(entries.items())[-HASH_CACHE_ENTRIES:])
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(tmp, cache)
        except OSError:
            pass
    return digest


def fingerprint(path: str | Path) -> dict:
    """Model identity: architecture and dims plus sha256 of config.json, every weight file and
    tokenizer.json (a large weight file's digest remembered while it is unchanged: sha256_weights)."""
    path = Path(path)
    args = ModelArgs.from_hf_config(_read_config(path))
    return {
        "architecture": args.architecture,
        "args": asdict(args),
        "config_sha256": sha256_file(path / "config.json"),
        "weights_sha256": {f.name: sha256_weights(f) for f in weight_files(path)},
        "tokenizer_sha256": sha256_file(path / "tokenizer.json"),
    }
