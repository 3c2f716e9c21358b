"""MemorySpec and memorize: the memory-write recipe as one typed object, and the one function that
turns references into memories (paper §3.1-3.3; ../shared/docs/memory3-paper.md §2-3).

A MemorySpec is built once: from a CompileConfig and the loaded model when compiling
(`MemorySpec.from_config`), from a kb's manifest when reading, training, verifying or repairing
(`MemorySpec.from_manifest`). Compile, verify, repair, train and the read side's full-reference
baseline all call `memorize(model, token_lists, spec)`, so there is one write recipe: the write
prefix at positions 0..p-1, each reference alone behind it, padded to the spec's width, the memory
layers' q/k/v, the paper's top-k per layer and kv head. Quantization is the spec's scheme, applied
by pack.encode_payload after memorize (training reads unquantized memories).

The spec is also the kb's identity: two kbs whose specs differ hold memories that cannot be mixed.
Its field names are those of the format (formats/manifest.md, "identity"), not CLI spellings.

Shape letters: L memory layers, H kv heads, K kept tokens, D head dim.
"""

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

import numpy as np

from m3compile.chunk import CHUNK_RULE_VERSION
from m3compile.errors import M3Error
from m3compile.pack import FORMAT as PAYLOAD_FORMAT, FORMAT_VERSION as PAYLOAD_VERSION, payload_nbytes
from m3compile.quantize import Scheme, get_scheme

if TYPE_CHECKING:
    from m3compile.model import Transformer
    from m3compile.sparsify import SparseKV
# the model side (torch, encode, model, sparsify) is imported by the functions that run it: a kb's
# spec is read from its manifest by every command, and `m3 query`/`m3 inspect` need no torch (~1.5 s)


@dataclass(frozen=True)
class MemorySpec:
    # the model the memories belong to (paper Remark 9: memories are tied to one checkpoint)
    model_config_sha256: str  # sha256 of its config.json
    model_weights_sha256: tuple[tuple[str, str], ...]  # (weight file name, sha256), sorted by name
    tokenizer_sha256: str  # sha256 of its tokenizer.json
    n_layers: int  # layers of the model
    n_kv_heads: int  # H
    head_dim: int  # D
    # how references are cut (formats/chunking.md)
    width: int  # I: tokens per reference at most; every encode batch is padded to it
    boundary: str  # "sentence" or "fixed"
    min_fill: float  # "sentence" cuts keep a non-final reference at least this full
    chunk_rule_version: int  # version of the cutting rule
    # how a reference becomes a memory (paper §3.2-3.3)
    prefix: str  # write prefix text after BOS (the paper's `<s>Reference:`)
    prefix_ids: tuple[int, ...]  # its token ids, BOS included; reference token j sits at p + j
    memory_layers: tuple[int, ...]  # layers whose key-values are kept
    top_k: int  # tokens kept per memory layer and kv head
    quant: str  # full quant scheme name as stored, e.g. "int8-sym-g16", "vq-pq4", "vq:PQ8x4"
    dtype: str  # compute dtype of the forward pass: "float32" or "bfloat16"
    codebooks_sha256: str | None = None  # vq: the trained codebooks the codes mean something with
    # vq: the codebooks themselves (m3compile/codebooks.py loads them); state, not identity
    codebooks: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "model_weights_sha256", tuple(sorted(map(tuple, self.model_weights_sha256))))
        object.__setattr__(self, "prefix_ids", tuple(self.prefix_ids))
        object.__setattr__(self, "memory_layers", tuple(self.memory_layers))

    @classmethod
    def from_config(cls, config, ck, model_id: dict, kept_width: int | None = None) -> "MemorySpec":
        """The spec of a compile: its CompileConfig, the checkpoint (its `args` and `tokenizer`; no
        weights are read) and its fingerprint.

        Checks the settings against the model: memory layers exist, the reference width fits the
        model's positions behind the write prefix, top-k is at most the width.
        """
        assert None not in (config.max_tokens, config.boundary, config.min_fill, config.prefix, config.top_k), \
            ("resolve the config first: CompileConfig.resolved", config)
        from m3compile.tokenizer import write_prefix

        a = ck.args
        layers = config.resolve_layers(a.n_layers)
        prefix_ids = write_prefix(ck.tokenizer, config.prefix)
        if not prefix_ids:
            # reading puts the write prefix (and BOS) before the text: with neither, the text's first
            # token has nothing to be predicted from (m3 eval, m3 train), and a reference's first
            # token sits alone at position 0 when written
            raise M3Error(f"--prefix {config.prefix!r} with a tokenizer that has no BOS leaves the write prefix empty; "
                          "give a prefix text (the default is 'Reference:', paper §3.2; a kb compiled so before "
                          "m3compile 0.2.0: `m3 compile CORPUS -o KB --rebuild --prefix Reference:`)")
        # a forward spans the model's positions, or its sliding window where that is shorter (the
        # runtime refuses a longer span); reading puts the references' interval after the write
        # prefix, then the BOS and the text: a width that leaves no text token is a kb none can read
        limit, what = a.span
        # a kb of this width written before 0.2.0 took only the write's room (limit - p): it is grown,
        # checked and repaired as it is (reading it says how much text fits)
        after = (ck.tokenizer.bos_id is not None) + 1 if config.max_tokens != kept_width else 0
        room = limit - len(prefix_ids) - after
        if config.max_tokens > room:
            reading = (f", and reading puts {'the BOS and ' if after == 2 else ''}at least one text token after the "
                       "references" if after else "")
            raise M3Error(f"--max-tokens {config.max_tokens} does not fit the model: it has {limit} positions ({what}); "
                          f"the write prefix takes {len(prefix_ids)}{reading}; use at most {room}")
        if config.top_k > config.max_tokens:
            raise M3Error(f"--top-k {config.top_k} exceeds the reference width --max-tokens {config.max_tokens}: "
                          f"a reference has at most {config.max_tokens} tokens to keep; use --top-k {config.max_tokens} "
                          "or less")
        if config.quant == "vq" or config.quant.startswith(("vq-", "vq:")):
            from m3compile.codebooks import resolve_quant

            quant = resolve_quant(config.quant, a.head_dim)  # codebooks come later: with_codebooks
        else:
            quant = get_scheme(config.quant, config.dtype, head_dim=a.head_dim).name  # `none` takes the dtype's name
        return cls(model_config_sha256=model_id["config_sha256"],
                   model_weights_sha256=tuple(model_id["weights_sha256"].items()),
                   tokenizer_sha256=model_id["tokenizer_sha256"], n_layers=a.n_layers, n_kv_heads=a.n_kv_heads,
                   head_dim=a.head_dim, width=config.max_tokens, boundary=config.boundary, min_fill=config.min_fill,
                   chunk_rule_version=CHUNK_RULE_VERSION, prefix=config.prefix, prefix_ids=tuple(prefix_ids),
                   memory_layers=layers, top_k=config.top_k, quant=quant, dtype=config.dtype)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "MemorySpec":
        """The spec a kb was written with, from its manifest document (format_version 1 and on).

        Reads only sections that every version has written with the same meaning: model, write,
        quant and config (formats/manifest.md)."""
        m, w, c = manifest["model"], manifest["write"], manifest["config"]
        return cls(model_config_sha256=m["config_sha256"], model_weights_sha256=tuple(m["weights_sha256"].items()),
                   tokenizer_sha256=m["tokenizer_sha256"], n_layers=m["n_layers"], n_kv_heads=m["n_kv_heads"],
                   head_dim=m["head_dim"], width=w["max_tokens"], boundary=c["boundary"], min_fill=c["min_fill"],
                   chunk_rule_version=w["chunk_rule_version"], prefix=w["prefix_text"],
                   prefix_ids=tuple(w["prefix_ids"]), memory_layers=tuple(w["memory_layers"]), top_k=w["top_k"],
                   quant=manifest["quant"]["scheme"], dtype=m["dtype"],
                   codebooks_sha256=manifest["quant"].get("vq", {}).get("sha256"))

    # ---- derived ----------------------------------------------------------------------------------

    @cached_property
    def scheme(self) -> Scheme:
        return get_scheme(self.quant, codebooks=self.codebooks)

    def with_codebooks(self, codebooks, sha256: str) -> "MemorySpec":
        """This spec with its trained VQ codebooks (their sha256 joins the identity and content keys)."""
        return replace(self, codebooks_sha256=sha256, codebooks=codebooks)

    @property
    def position_offset(self) -> int:
        """p: reference token j was encoded at RoPE position p + j."""
        return len(self.prefix_ids)

    def max_payload(self) -> int:
        """The largest decompressed payload a reference of this spec can have (a zstd-bomb bound)."""
        return payload_nbytes(self.scheme, len(self.memory_layers), self.n_kv_heads, self.top_k, self.head_dim)

    def identity(self) -> dict:
        """The kb identity (manifest "identity"): every field, by its format name."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "codebooks"}
        if d["codebooks_sha256"] is None:
            del d["codebooks_sha256"]  # kbs without codebooks keep the identity they always had
        d["model_weights_sha256"] = dict(self.model_weights_sha256)
        d["prefix_ids"], d["memory_layers"] = list(self.prefix_ids), list(self.memory_layers)
        return d

    def differences(self, other: "MemorySpec") -> list[str]:
        """Names of the fields where two specs differ, in field order."""
        return [f.name for f in fields(self) if f.compare and getattr(self, f.name) != getattr(other, f.name)]

    def key_context(self) -> bytes:
        """The part of every content key shared by all references of this spec.

        The JSON below is frozen: it is what every kb since format_version 1 hashed, so frames
        written by earlier versions are found again by key, except a bf16 kb's: since 0.2.0 bf16
        models select with bf16 logits (sparsify) and attend with torch's bf16 softmax (model),
        so their memories have other bits, and "bf16_recipe" keys them apart. Chunking settings
        are not in it: they decide the token ids, which the key hashes anyway.
        """
        ctx = {"model": {"config_sha256": self.model_config_sha256,
                         "weights_sha256": dict(self.model_weights_sha256),
                         "tokenizer_sha256": self.tokenizer_sha256},
               "prefix_ids": list(self.prefix_ids), "top_k": self.top_k, "memory_layers": list(self.memory_layers),
               "quant": self.quant, "dtype": self.dtype, "pad_to": self.width,
               "payload": f"{PAYLOAD_FORMAT}/{PAYLOAD_VERSION}"}
        if self.dtype == "bfloat16":  # 0.2.0: bf16 selection logits and softmax, other bits than 0.1.0's
            ctx["bf16_recipe"] = 2
        if self.codebooks_sha256 is not None:  # a vq code is only valid with the codebooks that wrote it
            ctx["codebooks_sha256"] = self.codebooks_sha256
        return hashlib.sha256(json.dumps(ctx, sort_keys=True).encode()).digest()

    def ref_key(self, token_ids: Sequence[int], context: bytes | None = None) -> bytes:
        """A reference's 32-byte content key: sha256 of the key context and its token ids (int32 LE)."""
        ctx = self.key_context() if context is None else context
        return hashlib.sha256(ctx + np.asarray(token_ids, dtype="<i4").tobytes()).digest()

    def with_full_references(self, memory_layers: Sequence[int] | None = None) -> "MemorySpec":
        """This spec keeping every token (top-k = width), optionally in other layers: the
        no-sparsity baseline of the read side (evaluate.py)."""
        layers = self.memory_layers if memory_layers is None else tuple(memory_layers)
        return replace(self, top_k=self.width, memory_layers=layers)


def memorize(model: "Transformer", token_lists: Sequence[Sequence[int]], spec: MemorySpec,
             grad: bool = False) -> "list[SparseKV]":
    """The memories of references: each encoded alone behind the spec's write prefix, its top-k
    tokens per memory layer and kv head kept (paper §3.2-3.3). Not yet quantized.

    Args:
        model: the checkpoint's model; its weights must be those the spec names.
        token_lists: the references' token ids, each at most spec.width long.
        spec: the write recipe.
        grad: keep autograd through the kept keys and values (training, paper §3.6). The selection
            scores are detached either way: top-k is discrete and gets no gradient.
    Returns:
        One SparseKV per reference: keys/values (L, H, K, D) post-RoPE in the model dtype, on the
        CPU; positions (L, H, K), K = min(top_k, its length).
    Example:
        >>> kb = open_kb("kb/"); ck = load_kb_model(kb, dtype=kb.spec.dtype)
        >>> memorize(ck.model, [[412, 9, 77]], kb.spec)[0].keys.shape  # the embedded reader's kb
        torch.Size([1, 2, 3, 32])
    """
    import torch

    from m3compile.encode import EncodedBatch, encode_batch
    from m3compile.model import LayerKV
    from m3compile.sparsify import select_topk

    a = model.args
    if (a.n_layers, a.n_kv_heads, a.head_dim) != (spec.n_layers, spec.n_kv_heads, spec.head_dim):
        raise M3Error(f"the model ({a.n_layers} layers, {a.n_kv_heads} kv heads x {a.head_dim}) is not the one this "
                      f"spec's memories belong to ({spec.n_layers} layers, {spec.n_kv_heads} kv heads x "
                      f"{spec.head_dim}); load the kb's checkpoint (m3compile.load_kb_model(kb))")
    if not token_lists:
        return []
    long = max(len(t) for t in token_lists)
    if long > spec.width:
        raise M3Error(f"a reference of {long} tokens is wider than the kb's {spec.width}; cut it first")
    if min(len(t) for t in token_lists) == 0:
        raise M3Error("a reference has no tokens; a memory needs at least one (drop empty references)")
    vocab = model.args.vocab_size
    bad = next((i for t in token_lists for i in t if not 0 <= i < vocab), None)
    if bad is not None:
        raise M3Error(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}); encode the text "
                      "with the model's own tokenizer")
    with torch.set_grad_enabled(grad):
        enc = encode_batch(model, token_lists, spec.prefix_ids, spec.memory_layers, pad_to=spec.width)
    kv = {l: LayerKV(t.q_pre.detach(), t.k_pre.detach(), t.k_post, t.v) for l, t in enc.kv.items()}
    # scores in float32 whatever the caller's autocast: bf16 rounding must not change the ranking
    with torch.autocast(model.device.type, enabled=False), torch.set_grad_enabled(grad):
        return select_topk(EncodedBatch(kv, enc.mask, enc.n_tokens), spec.top_k)
