"""A Llama-family decoder in plain PyTorch: config, modules, RoPE, and one checkpoint loader.

In the spirit of gpt-fast's `model.py` and llama2.c's `model.py`, but with hooks the Memory³
paper needs (arXiv 2407.01178 §3.1-3.3, ../shared/docs/memory3-paper.md §3 and §5):
  * `Transformer.forward_kv` returns, for chosen layers, the per-head queries and keys *before*
    rotary embedding (the paper scores tokens without positions), the keys *after* it and the
    values (what a memory stores), and stops once the last requested layer has its key-values;
  * every attention takes optional extra key-values placed in front of the context under one
    softmax (paper Eq. 4), which is how the read side attends to memories.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM in Hugging Face layout —
grouped-query attention, explicit head_dim, q/k/v(/o) biases, tied embeddings, rope_theta and the
`llama3` rope scaling. RoPE uses the HF half-split ("rotate_half") layout, so loading is a pure
rename with no q/k permutation. Numerics follow transformers' eager path (RMSNorm in float32,
RoPE tables in float32 then cast), which is what the parity tests hold us to.

Shape letters: B batch, T tokens, S key length (memory + context), M memory tokens,
N query heads, H kv heads, D head dim, C model dim, F FFN width, V vocab.
"""

import ctypes
import json
import os
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from m3compile.config import BATCH_TOKENS
from m3compile.errors import M3Error
# the config, files and identity of a checkpoint directory, read without torch (checkpoint.py says why
# they left this file); `from m3compile.model import ModelArgs` still works
from m3compile.checkpoint import ModelArgs, _read_config, weight_files
from m3compile.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# bf16 matmuls on a CPU without bf16 units. There torch emulates them: on a 2-core AVX2-only AMD
# EPYC (torch 2.13, 2026-12-07) a (2048 x 768) @ (768 x 2048) bf16 linear took 319 ms against 36 ms
# for the same product of the operands cast to float32 (8.8x; square matmuls 0.3 GFLOP/s at 2048
# and 1.3 at 512 against 185 in float32), and attention's (16, 4, 384, 64) @ (64, 128) 49 against 2.8 ms. So `linear` and `matmul`
# below compute a bf16 product there as the float32 product of the operands cast up (exact: a
# product of two bf16 values fits float32's mantissa), accumulated in float32 and rounded to bf16
# once: what AMX and AVX512-BF16 compute, but for the order of the sums (1 ulp in ~1e-4 of the
# outputs against torch's emulation, as AMX against AVX512-BF16). Below UPCAST_MIN_ROWS rows (a
# generation step's projections) torch's own bf16 path is as fast (1 row: 0.17 against 0.26 ms with
# the cast) and is kept. A compile's row counts are fixed by its spec (memorize pads to the width,
# PackedRows packs whole blocks), so which path a product takes never depends on the batch. float16
# stays torch's (emulated too; no dtype choice offers it). None = read /proc/cpuinfo on first use
# (unreadable: no units); tests set it to force either path.
CPU_BF16_UNITS: bool | None = None
UPCAST_MIN_ROWS = 8
UPCAST_CHUNK = 1 << 22  # weight elements cast to float32 at once (16 MB): a large vocabulary's head in parts


def _upcast(x: torch.Tensor, rows: int) -> bool:
    """Whether a bf16 product with `rows` rows of x runs in float32 (see CPU_BF16_UNITS)."""
    global CPU_BF16_UNITS
    if x.dtype is not torch.bfloat16 or x.device.type != "cpu" or rows < UPCAST_MIN_ROWS:
        return False
    if CPU_BF16_UNITS is None:
        CPU_BF16_UNITS = bf16_is_native("cpu")
    return not CPU_BF16_UNITS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); in bf16 on a CPU without bf16 units, in float32 on the operands
    cast up and rounded to bf16 once (CPU_BF16_UNITS), the weight cast UPCAST_CHUNK elements at once."""
    if not _upcast(x, x.numel() // max(1, x.shape[-1])):
        return F.linear(x, weight, bias)
    xf, step = x.float(), max(1, UPCAST_CHUNK // max(1, weight.shape[-1]))
    if weight.shape[0] <= step:
        return F.linear(xf, weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    # a large weight (a vocabulary's head) in parts, each written into the bf16 result: no float32
    # copy of the whole weight or of the whole output is held
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for lo in range(0, weight.shape[0], step):
        out[..., lo:lo + step] = F.linear(xf, weight[lo:lo + step].float(),
                                          None if bias is None else bias[lo:lo + step].float())
    return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; in bf16 on a CPU without bf16 units, in float32 and rounded once, as `linear`."""
    if not _upcast(a, a.shape[-2] if a.dim() > 1 else 1):
        return a @ b
    return (a.float() @ b.float()).to(torch.bfloat16)


class Linear(nn.Linear):
    """nn.Linear through `linear` (the same parameters and state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)



def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] in float32, with llama3 scaling if configured (as transformers)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (D/2,)
    if not args.rope_scaling:
        return inv_freq
    s = dict(args.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # (D/2,)
    smooth = (old_len / wavelen - low) / (high - low)  # (D/2,)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # (D/2,)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, 1, T, D] for integer positions [B, T], computed in float32."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)  # (B, 1, T, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, D] in the half-split layout (pairs i and i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, D/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, heads, T, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # torch's fused kernel: the bits of the float32 formula below (checked on 60 random
            # inputs of widths 128-4096, and by the golden kb), 2.3x faster (105 against 238 us at
            # the embedded reader's 1952 x 128 rows, 2 AVX512 cores). Not for bf16: it rounds once
            # where the formula rounds twice (normalised to bf16, then scaled), other bits
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in float32 like transformers, then scale in the input dtype
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if h is x or torch.is_grad_enabled() or self.weight.dtype != x.dtype:
            return self.weight * (h * r).to(x.dtype)
        # no autograd and h a copy: in place, the same bits with two fresh tensors fewer per call
        return h.mul_(r).to(x.dtype).mul_(self.weight)


class LayerKV(NamedTuple):
    q_pre: torch.Tensor  # (B, N, T, D) queries before RoPE
    k_pre: torch.Tensor  # (B, H, T, D) keys before RoPE
    k_post: torch.Tensor  # (B, H, T, D) keys after RoPE (what a memory stores)
    v: torch.Tensor  # (B, H, T, D) values


class ExtraKV(NamedTuple):
    """Key-values put in front of the context in one layer (paper Eq. 4), e.g. memories."""

    k: torch.Tensor  # (B, H, M, D) keys, already rotated to their own positions
    v: torch.Tensor  # (B, H, M, D)
    visible: torch.Tensor  # (B, T, M) bool: may query t attend to extra token m


class KVCache:
    """Context key-values of earlier forward calls, per layer, for incremental decoding.

    Holds post-RoPE keys and values (B, H, S, D) and which of the S cached keys are real tokens.
    Memories (ExtraKV) are not cached: the read side swaps them per chunk.
    """

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.key_mask: torch.Tensor | None = None  # (B, S) bool
        self.next_pos: torch.Tensor | None = None  # (B,) the RoPE position after the last cached token

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def expand(self, batch: int) -> "KVCache":
        """This one-row cache repeated for `batch` rows (views: the tensors are not copied)."""
        assert self.key_mask is not None and self.key_mask.shape[0] == 1, "expand a one-row cache"
        out = KVCache()
        out.k = {l: t.expand(batch, -1, -1, -1) for l, t in self.k.items()}
        out.v = {l: t.expand(batch, -1, -1, -1) for l, t in self.v.items()}
        out.key_mask, out.next_pos = self.key_mask.expand(batch, -1), self.next_pos.expand(batch)
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, H, S+T, D)
            v = torch.cat([self.v[layer], v], dim=2)  # (B, H, S+T, D)
        self.k[layer], self.v[layer] = k, v
        return k, v


def kept_while_unchanged(owner, name: str, tensors, make, key=()):
    """make()'s result, kept on `owner` as attribute `name` while `tensors` (weights) and `key`
    are unchanged: an optimizer step or a load changes a tensor's version, a move or a cast its
    storage. Tensors made in inference mode have no version: nothing to key on, made each call."""
    try:
        stamp = (key, tuple((t.data_ptr(), t._version) for t in tensors))
    except RuntimeError:
        return make()
    kept = getattr(owner, name, None)
    if kept is None or kept[0] != stamp:
        kept = (stamp, make())
        setattr(owner, name, kept)
    return kept[1]


class AttentionMask:
    """Which keys each query sees, (B, 1, T, S) bool, shared by the layers of one forward, and
    its additive form per dtype, made once a forward.

    Adding the bias gives the bits of masked_fill_(~keep, min): a score plus the dtype's min
    rounds to the min (|score| < 1e31 in float32, 1e36 in bf16). It is 7x faster: masked_fill_
    broadcast over the heads took 292 us at the embedded reader's 64 x 4 x 32 x 41 scores, the
    add 42 (2 AVX512 cores); the bias is 1/heads of the scores' size. Per dtype because training
    autocasts the scores to bf16, where float32's min is -inf."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # (B, 1, T, S) bool
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """0 where a key is seen, the dtype's min elsewhere, (B, 1, T, S)."""
        if dtype not in self._bias:
            self._bias[dtype] = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device).masked_fill_(
                ~self.keep, torch.finfo(dtype).min)
        return self._bias[dtype]


class PackedRows:
    """The rows of a padded (B, T) batch that forward_kv computes outside attention: the real
    tokens, packed into whole blocks of ROW_BLOCK rows (a zero tail fills the last block).

    Everything in a block but attention is row-wise (norms, projections, SwiGLU, residuals), so
    padding rows need not go through it: their keys and values are masked in attention, the
    selection masks them as queries and keys, and no memory keeps them. Attention still runs on
    the (B, T) layout, with zeros at the rows not computed (a masked key's probability is exactly
    0, so 0 * v adds nothing, as before).

    Why whole blocks: a reference's memory must not depend on the batch it was encoded in
    (resumed, incremental and differently batched compiles give the same bytes). A row of x @ W.T
    has the same bits whatever the other rows' values and its own place among them, but only at a
    fixed row count: BLAS picks kernels and splits work by the row count. On a CPU with AMX
    (torch 2.13, 2026-12-06) a bf16 row of a 768-wide matmul came out different at 48, 160 or 1024
    rows than at 2048, and a float32 row of a 2048-wide one (the 110M shape's down projection) at
    16-160 rows on two threads, so kbs of that shape changed with --batch-size; on the AVX512
    machine where packing was measured first every count from 16 up agreed. So every matmul here
    runs on exactly ROW_BLOCK rows (more rows: one call per block). The junk rows of the tail stay
    zero without biases and are never read back. Only on the CPU, where that was measured (on CUDA
    cuBLAS may pick kernels by row count too; not measured, no GPU was at hand), and only without
    autograd (training keeps the plain path).
    """

    ROW_BLOCK = BATCH_TOKENS  # rows a matmul call sees: a default batch's tokens fill one block

    def __init__(self, rows: torch.Tensor, shape: tuple[int, int]):
        self.rows = rows  # (n,) int64, ascending indices of the real rows among the B*T
        self.shape = shape  # (B, T)
        self.n_rows = -(-max(len(rows), 1) // self.ROW_BLOCK) * self.ROW_BLOCK  # P: whole blocks

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None, device: torch.device) -> "PackedRows | None":
        if attention_mask is None or torch.is_grad_enabled() or device.type != "cpu":
            return None
        B, T = attention_mask.shape
        return cls(attention_mask.reshape(-1).bool().nonzero()[:, 0], (B, T))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (P, F): the real rows, then zeros up to whole blocks."""
        out = x.new_zeros(self.n_rows, x.shape[-1])
        torch.index_select(x.reshape(-1, x.shape[-1]), 0, self.rows, out=out[:len(self.rows)])
        return out

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(P, F) -> (B, T, F), zeros at the rows not real."""
        B, T = self.shape
        return y.new_zeros(B * T, y.shape[-1]).index_copy_(0, self.rows, y[:len(self.rows)]).view(B, T, -1)

    def rowwise(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn (row-wise, matmuls inside) of x (P, F), one ROW_BLOCK-row call at a time."""
        if x.shape[0] == self.ROW_BLOCK:
            return fn(x)
        return torch.cat([fn(b) for b in x.split(self.ROW_BLOCK)])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        n, h, d = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, n * d, bias=args.qkv_bias)
        self.wk = Linear(args.dim, h * d, bias=args.qkv_bias)
        self.wv = Linear(args.dim, h * d, bias=args.qkv_bias)
        self.wo = Linear(n * d, args.dim, bias=args.o_bias)

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """wq, wk and wv as one matrix (and bias), kept while the weights are unchanged: one
        matmul and one unpack instead of three. Like PackedRows, only used without autograd on the
        CPU, where every compile takes this path. A column of x @ W.T mostly has the bits of its own
        matrix's product (float32 and bf16, 1 and 2 threads, widths 64-2048, 1-2048 rows, on an
        AVX512 CPU), but not always: on a CPU with AMX bf16 q/k/v of width 768 differ at some row
        counts, so the plain path (training) gives other bits than a compile. The copy costs the
        memory of those three matrices in the layers a compile runs (the first half of a model)."""
        parts = (self.wq, self.wk, self.wv)

        def fused():
            return (torch.cat([m.weight for m in parts]),
                    torch.cat([m.bias for m in parts]) if self.wq.bias is not None else None)

        return kept_while_unchanged(self, "_m3_qkv", [t for m in parts for t in (m.weight, m.bias) if t is not None],
                                    fused)

    def project(self, x, cos, sin, packed: "PackedRows | None" = None) -> LayerKV:
        """q/k/v of x (B, T, C); with `packed`, x is (P, C), the rows packed.rows of the (B*T, C)
        matrix, and the result is laid out (B, ., T, D) with zeros at the rows not computed."""
        a = self.args
        if packed is None:
            B, T, _ = x.shape
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            (B, T), qkv = packed.shape, packed.unpack(packed.rowwise(lambda r: linear(r, *self._qkv()), x))
            q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
        q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, N, T, D)
        k = k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        return LayerKV(q, k, apply_rope(k, cos, sin), v)

    def forward(self, x, cos, sin, mask, extra: ExtraKV | None = None, cache: tuple | None = None,
                packed: "PackedRows | None" = None):
        a = self.args
        B, T = x.shape[:2] if packed is None else packed.shape
        kv = self.project(x, cos, sin, packed)
        q = apply_rope(kv.q_pre, cos, sin)  # (B, N, T, D)
        k, v = kv.k_post, kv.v
        if cache is not None:
            store, layer = cache
            k, v = store.update(layer, k, v)  # (B, H, S+T, D) each
        if extra is not None:
            k = torch.cat([extra.k.to(k.dtype), k], dim=2)  # (B, H, M+T, D)
            v = torch.cat([extra.v.to(v.dtype), v], dim=2)  # (B, H, M+T, D)
            mask = AttentionMask(torch.cat([extra.visible[:, None], mask.keep], dim=-1))  # (B, 1, T, M+T)
        # grouped-query: query head n reads kv head n // n_rep (transformers' repeat_kv). The R
        # query heads of a kv head are one (R*T)-row matrix against its k and v, so no repeated copy
        # of k and v is made: the same bits as repeat_kv (float32 and bfloat16, checked on 5 shapes)
        H, R, S, D = a.n_kv_heads, a.n_rep, k.shape[2], a.head_dim
        scores = matmul(q.reshape(B, H, R * T, D), k.transpose(-2, -1)).view(B, a.n_heads, T, S).mul_(D**-0.5)
        # masked scores become the dtype's min (a fully masked row, a padding query, then gets a
        # finite uniform row instead of NaN), by adding mask.bias: see AttentionMask
        scores.add_(mask.bias(scores.dtype))  # (B, N, T, S)
        if scores.dtype == torch.bfloat16:
            # torch's bf16 softmax computes in float32 and rounds once: the probabilities of a
            # float32 softmax and a cast but for 1 ulp in ~6e-6 of them, without a float32
            # (B, N, T, S) tensor (13 MB a layer at the 110M shape). Inside compiles of the 110M
            # shape the float32 softmax took 1.09x the encode+select (benchmarks/bf16_recipe.py);
            # in a loop of encodes alone 1.00x (encode_speed.py --shape 110m), in isolation 1.2x
            # (2.7 against 2.2 ms at 16 x 12 x 128 x 132 causal scores); the embedded reader 0.99x.
            # 2 AVX512-BF16 cores. Since 0.2.0 (bf16 content keys say so: MemorySpec.key_context)
            probs = F.softmax(scores, dim=-1)  # (B, N, T, S)
        else:
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, N, T, S)
        out = matmul(probs.view(B, H, R * T, S), v).view(B, a.n_heads, T, D)  # (B, N, T, D)
        out = out.transpose(1, 2).reshape(B, T, a.n_heads * D)  # (B, T, N*D)
        if packed is not None:
            return packed.rowwise(self.wo, packed.pack(out)), kv  # (P, C)
        return self.wo(out), kv


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # gate
        self.w3 = Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up
        self.w2 = Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(self.w3(x)))  # the same bits, no fresh tensors


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, extra: ExtraKV | None = None, cache: tuple | None = None,
                packed: "PackedRows | None" = None):
        # with `packed` x is (P, C): everything but attention is row-wise and runs on those rows only
        h, kv = self.attention(self.attention_norm(x), cos, sin, mask, extra, cache, packed)
        if torch.is_grad_enabled():
            h = x + h
            return h + self.feed_forward(self.ffn_norm(h)), kv
        h.add_(x)  # in place on fresh outputs (no autograd): the same bits as x + h
        if packed is not None:
            return packed.rowwise(self.feed_forward, self.ffn_norm(h)).add_(h), kv
        return self.feed_forward(self.ffn_norm(h)).add_(h), kv


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # math on the meta device (load_checkpoint builds the module there) runs torch._refs,
        # whose first call imports torch._dynamo: 1.2 s of every compile. So the embedding's
        # weight is given (nn.Embedding then skips its normal_ init) and inv_freq is computed on
        # the CPU; nn.Linear's init does not go through torch._refs.
        emb = torch.empty(args.vocab_size, args.dim)
        if emb.device.type != "meta":
            nn.init.normal_(emb)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=emb)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_weights(self, seed: int, std: float = 0.02):
        """Deterministic random init (normal(0, std) matrices, unit norms, zero biases)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters()):
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def _prepare(self, tokens, attention_mask, positions, cache: KVCache | None = None):
        B, T = tokens.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)  # (B, T)
        attention_mask = attention_mask.bool()
        if positions is None:
            # count only real tokens, so left and right padding both give 0, 1, 2, ... per row
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            if cache is not None and cache.next_pos is not None:
                positions = positions + cache.next_pos[:, None]
        span = int(positions.max()) + 1 if positions.numel() else 0
        if self.args.sliding_window is not None and span > self.args.sliding_window:
            raise M3Error(
                f"sequence spans {span} positions but the model's sliding window is "
                f"{self.args.sliding_window}: sliding-window attention is not supported; "
                "use shorter inputs or a checkpoint without an active sliding window"
            )
        S = cache.length if cache is not None else 0
        # query t sees every cached key and the new keys up to itself
        causal = torch.ones(T, S + T, dtype=torch.bool, device=tokens.device).tril(diagonal=S)  # (T, S+T)
        keys = attention_mask if not S else torch.cat([cache.key_mask, attention_mask], dim=1)  # (B, S+T)
        mask = causal[None, None] & keys[:, None, None, :]  # (B, 1, T, S+T)
        if cache is not None:
            cache.key_mask = keys
            cache.next_pos = positions.max(dim=1).values + 1  # (B,)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)  # (B, 1, T, D) each
        return self.tok_embeddings(tokens), cos, sin, AttentionMask(mask)  # x: (B, T, C)

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        extra: dict[int, ExtraKV] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T].

        attention_mask [B, T] (True = real token) masks padding as keys; positions [B, T] are the
        RoPE positions (default: 0, 1, ... over the real tokens of each row, continuing the cache);
        extra maps a layer index to key-values attended in front of the context in that layer
        (memories); cache, when given, is extended with this call's key-values and its earlier
        content is attended as context.
        """
        x, cos, sin, mask = self._prepare(tokens, attention_mask, positions, cache)
        extra = extra or {}
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, mask, extra.get(i), (cache, i) if cache is not None else None)
        return self.output(self.norm(x))  # (B, T, V)

    def prefill(self, tokens: torch.Tensor, last: int) -> KVCache:
        """The key-values of `tokens` [B, T] (all real, positions 0..T-1) in layers 0..last.

        The write prefix is the same in every reference and, attention being causal, so are its
        key-values: encode computes them once with this and attends to them as a cache
        (they were a fifth of every forward of the embedded model: 9 of 41 positions)."""
        cache = KVCache()
        kv = self.forward_kv(tokens, [last], cache=cache)[last]  # fills the cache's layers 0..last-1
        cache.update(last, kv.k_post, kv.v)
        return cache

    def forward_kv(
        self,
        tokens: torch.Tensor,
        layers: Sequence[int],
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> dict[int, LayerKV]:
        """Queries/keys (pre- and post-RoPE) and values of the requested layers.

        Runs blocks only up to the last requested layer, and of that one only the q/k/v
        projections: nothing that no requested layer needs is computed (paper App. A.2). With a
        cache (e.g. `prefill`'s), the tokens attend to its key-values first; what is returned
        covers the new tokens only. positions may be (1, T) when every row has the same ones
        (encode's): the RoPE tables are then computed once and broadcast.
        """
        wanted = sorted(set(layers))
        assert wanted and 0 <= wanted[0] and wanted[-1] < self.args.n_layers, (layers, self.args.n_layers)
        x, cos, sin, mask = self._prepare(tokens, attention_mask, positions, cache)
        packed = PackedRows.of(attention_mask, x.device)
        if packed is not None:
            x = packed.pack(x)  # (P, C)
        out = {}
        for i in range(wanted[-1]):
            x, kv = self.layers[i](x, cos, sin, mask, None, (cache, i) if cache is not None else None, packed)
            if i in wanted:
                out[i] = kv
        last = self.layers[wanted[-1]]
        out[wanted[-1]] = last.attention.project(last.attention_norm(x), cos, sin, packed)
        return out


# Hugging Face tensor name -> ours. `{}` is the layer index. One table for all three architectures.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.feed_forward.w1.bias",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.feed_forward.w3.bias",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.feed_forward.w2.bias",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NUM = re.compile(r"\.(\d+)\.")
# tensors some exporters add that carry no weights (old transformers saved RoPE tables)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_FUSED_QKV = re.compile(r"(qkv_proj|W_pack|query_key_value|c_attn)")


def hf_to_ours(name: str) -> str | None:
    m = _LAYER_NUM.search(name)
    key = _LAYER_NUM.sub(".{}.", name, count=1) if m else name
    ours = WEIGHT_MAP.get(key)
    return ours.format(m.group(1)) if ours and m else ours


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes weights may have


def _load_state_dict(files: list[Path], args: ModelArgs, dtype: torch.dtype, device, shapes: dict) -> dict:
    """The checkpoint's tensors under the runtime's names, converted to `dtype` on `device`. Names,
    shapes and dtypes are checked against `shapes` (the runtime's, from config.json) from the file's
    header before any tensor is read: a 14 GB checkpoint beside a wrong config.json was read (and
    converted) whole before its first shape was found wrong."""
    state, unexpected, where = {}, [], {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for name in sf.keys():
                    if _IGNORED.search(name):
                        continue
                    if _FUSED_QKV.search(name):
                        raise M3Error(
                            f"fused QKV projection {name!r} in {f.name} is not supported; m3compile "
                            "needs separate q_proj/k_proj/v_proj tensors"
                        )
                    ours = hf_to_ours(name)
                    if ours is None:
                        unexpected.append(name)
                        continue
                    if ours == "output.weight" and args.tie_word_embeddings:
                        continue  # tied: the head is the embedding, as transformers does
                    if ours not in shapes:  # a config cut to fewer layers, a Qwen2 saved as Llama
                        raise M3Error(f"checkpoint tensor {name} ({ours}) is not part of the model config.json "
                                      "makes (other layers or biases); the weights do not match config.json")
                    if ours in where:
                        raise M3Error(f"tensor {name} is in both {where[ours]} and {f.name}; re-save the checkpoint")
                    where[ours] = f.name
                    part = sf.get_slice(name)
                    if part.get_dtype() not in _FLOAT_DTYPES:
                        raise M3Error(f"tensor {name} in {f.name} is {part.get_dtype()}, not floating point; "
                                      "quantized or integer weights are not supported: give float weights")
                    if tuple(part.get_shape()) != tuple(shapes[ours]):
                        raise M3Error(f"tensor {ours} has shape {tuple(part.get_shape())} but config.json implies "
                                      f"{tuple(shapes[ours])}")
                    state[ours] = sf.get_tensor(name).to(dtype)
        except M3Error:
            raise
        except Exception as e:  # safetensors raises its own error types on a corrupt file
            raise M3Error(f"cannot read weights {f}: {e}; the file is corrupt or not safetensors") from None
    if unexpected:
        raise M3Error(f"unexpected tensor(s) in checkpoint: {', '.join(sorted(unexpected)[:5])}; "
                      f"not part of a {args.architecture} with this config.json")
    return state


@dataclass
class Checkpoint:
    model: Transformer
    args: ModelArgs
    tokenizer: Tokenizer
    path: Path  # the checkpoint directory


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the kernel (process-wide; load_checkpoint calls it). Returns whether it was set.

    A forward on the CPU allocates and frees tensors of megabytes in every layer. By default glibc
    serves blocks over its mmap threshold (128 KiB, raised to at most 32 MiB as such blocks are
    freed) with a fresh mmap, and gives the top of its heap back once more than twice that is free:
    every new tensor is then page-faulted in and zeroed by the kernel again. A 0.25 MB compile of the
    110M shape spent 9.7 s in the kernel against 50.3 s in user code. With blocks up to 32 MiB taken
    from the heap and the heap kept (up to 1 GiB free at its top), the memory a process holds is
    its peak working set, as with PyTorch's caching allocators on GPUs. Bits do not depend on it.
    Only on Linux with glibc (not musl, macOS or Windows, where nothing is changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> Checkpoint:
    """Load a local Hugging Face checkpoint directory, strictly and offline.

    Args:
        path: directory with config.json, model.safetensors (or a sharded index) and tokenizer.json.
        device: where the weights go ("cpu", "cuda", ...).
        dtype: torch.float32, torch.bfloat16 or torch.float16 (or their names).
    Returns:
        Checkpoint with `.model` (eval mode), `.args`, `.tokenizer`, `.path`.
    Example:
        >>> ck = load_checkpoint("examples/model")
        >>> import torch; logits = ck.model(torch.tensor([ck.tokenizer.encode("Veldmoor")]))
    """
    path = Path(path)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise M3Error(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = check_device(device)
    keep_freed_memory()
    args = ModelArgs.from_hf_config(_read_config(path))
    tokenizer = Tokenizer.from_dir(path)
    for name, tid in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)):
        if tid is not None and tid >= args.vocab_size:  # the prefix's BOS: an IndexError at the first forward
            raise M3Error(f"the {name} token id {tid} is past the model's vocabulary ({args.vocab_size} "
                          "embeddings, config.json vocab_size); fix config.json or the tokenizer")
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = _load_state_dict(weight_files(path), args, dtype, device, shapes)
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        expected.discard("output.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise M3Error(f"checkpoint {path} lacks tensor(s) {', '.join(missing[:5])}; "
                      "the weights do not match config.json")
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return Checkpoint(model=model.eval(), args=args, tokenizer=tokenizer, path=path)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or an M3Error that names what is missing (not a weights error later on)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise M3Error(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise M3Error(f"--device {device}: no CUDA device is available to this torch ({torch.__version__}, "
                          f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu, or run on a "
                          "machine with a GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise M3Error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise M3Error(f"--device {device}: m3compile runs on cpu or cuda")
    return dev


def bf16_is_native(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run on hardware units here, so bf16 autocast pays.

    CUDA: the device supports bf16 (Ampere and later). CPU: the cores have AMX or AVX512-BF16 (Linux
    /proc/cpuinfo flags; on aarch64 the `bf16` feature). Elsewhere torch emulates bf16 matmuls:
    measured on a 2-core AVX2-only EPYC (2026-12-02), 1.25 GFLOP/s against 43 in float32, so a bf16
    "speed-up" there runs training 34x slower. Unknown platforms answer False (float32 is always right).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and cpuinfo_has_bf16(_cpuinfo())


def cpu_description() -> str:
    """The processor's model name and its bf16 matmul units (Linux /proc/cpuinfo), e.g. "Intel(R)
    Xeon(R) Processor; amx_bf16 avx512_bf16", for run.json: a bf16 matmul rounds otherwise on AMX
    than on AVX512-BF16 alone, so bf16 memories depend on the CPU. "unknown" where unreadable."""
    text = _cpuinfo()
    if not text:
        return "unknown"
    name = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "unknown")
    return f"{name}; {' '.join(bf16_units(text)) or 'no bf16 units'}"


def _cpuinfo() -> str:
    """/proc/cpuinfo's text, "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text names bf16 matmul units: x86 `amx_bf16` or `avx512_bf16` flags,
    aarch64 `bf16` feature."""
    return bool(bf16_units(cpuinfo))


def bf16_units(cpuinfo: str) -> list[str]:
    """The bf16 matmul units a /proc/cpuinfo text names, of `amx_bf16`, `avx512_bf16` (x86 flags)
    and `bf16` (an aarch64 feature), in that order."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]


def save_checkpoint(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    bos_id: int | None = None, eos_id: int | None = None) -> Path:
    """Write `model` as an ordinary Hugging Face checkpoint of its architecture (config.json +
    model.safetensors, plus tokenizer files copied from `tokenizer_dir`); see ModelArgs.to_hf_config."""
    out = Path(out_dir)
    config = model.args.to_hf_config(bos_id, eos_id)  # refuses before anything is written
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    ours_to_hf = {}
    for hf, ours in WEIGHT_MAP.items():
        for i in range(model.args.n_layers) if "{}" in hf else [None]:
            ours_to_hf[ours.format(i)] = hf.format(i)
    state = {ours_to_hf[k]: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not (k == "output.weight" and model.args.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if src.is_file():
                (out / name).write_bytes(src.read_bytes())
    # config.json last, through a temporary file: a directory that has one is a whole checkpoint (a
    # write cut short leaves none, and loading it says so)
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out

