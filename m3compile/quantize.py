"""Quantize memory key/value tensors: a registry of schemes, each a quantize/dequantize pair.

A memory is keys and values of shape (L, H, K, D): L memory layers, H kv-heads, K kept tokens,
D head dim (paper §3.3). Groups run along D, inside one token's vector, so one reference (and one
head) dequantizes alone. Every scheme has a full self-describing name (`none-bfloat16`,
`int8-sym-g16`, `int4-asym-g16`), recorded as the shard's `quant` string (formats/kv-shard.md);
readers rebuild the scheme from that string with `get_scheme`. The paper's vector quantizer
(§4.2, FAISS `OPQ20_80,Residual2x14,PQ8x10`) is one more family, `vq-<preset>` or `vq:<factory>`
(m3compile/vq.py), whose trained codebooks are a kb artefact (m3compile/codebooks.py).

Guarantees (checked by tests/test_quantize.py), with s the stored float16 scale of a group:
  none-*     dequantize(quantize(x)) == x bit for bit (bf16 and f16 widen to f32 exactly).
  intB-sym   s = absmax/qmax rounded *up* to float16, q = round(x/s) in [-qmax, qmax]
             (qmax = 2^(B-1)-1), so |x - x̂| <= s/2 and no value is clipped.
  intB-asym  m = min rounded *down* to float16, s = (max-m)/(2^B-1) rounded up, q = round((x-m)/s)
             in [0, 2^B-1], x̂ = q*s + m, so |x - x̂| <= s/2 and no value is clipped.
(plus float32 rounding of the arithmetic, a few ulps of the group's largest value.) Rounding the
stored scale outward is what makes the bound hold for the bytes on disk, not just in float32.
"""

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from m3compile.errors import M3Error

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions that make or take tensors: reading a kb's manifest,
# references and index (m3 query, m3 inspect) names schemes without paying torch's import (~1.5 s)

# little-endian on disk whatever the host; bfloat16 has no numpy dtype, so it travels as its bits
_NONE_DTYPES = {  # name (torch's dtype name) -> numpy storage dtype
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_SCALE = np.dtype("<f2")  # scales and mins: float16, rounded outward (see the module docstring)


@dataclass(frozen=True)
class PartSpec:
    name: str  # "codes", "scales", "mins" or "values"
    dtype: np.dtype  # little-endian storage dtype
    shape: tuple[int, ...]  # row-major


@dataclass(frozen=True)
class QuantKV:
    scheme: str  # full scheme name, as in the shard's `quant`
    shape: tuple[int, ...]  # shape of the float tensor, (L, H, K, D)
    parts: tuple[np.ndarray, ...]  # in the order of scheme.parts(shape); their bytes are the payload


@dataclass(frozen=True)
class QuantError:
    max_abs: float  # max |x - x̂| over all elements
    sq_err: float  # sum of (x - x̂)^2, float64
    sq_norm: float  # sum of x^2, float64

    @property
    def rel(self) -> float:  # ||x - x̂||_2 / ||x||_2
        return math.sqrt(self.sq_err / self.sq_norm) if self.sq_norm > 0 else 0.0

    def merge(self, other: "QuantError") -> "QuantError":
        return QuantError(max(self.max_abs, other.max_abs), self.sq_err + other.sq_err, self.sq_norm + other.sq_norm)


ZERO_ERROR = QuantError(0.0, 0.0, 0.0)


class Scheme(Protocol):
    name: str

    def parts(self, shape: tuple[int, ...]) -> tuple[PartSpec, ...]: ...
    def quantize(self, x) -> tuple[QuantKV, QuantError]: ...
    def dequantize(self, q: QuantKV) -> "torch.Tensor": ...


def _to_f32(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        assert x.is_floating_point(), x.dtype
        x = x.detach().to("cpu", torch.float32).numpy()  # exact for bf16/f16
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise M3Error("memory keys/values contain NaN or inf; the model produced them, so check the "
                      "checkpoint and the compute dtype (float16 overflows where bfloat16 does not)")
    return x


ERROR_BLOCK = 1 << 16  # float64 elements of x - x̂ at once in _errors: 512 KB


def _error(x: np.ndarray, xh: np.ndarray) -> QuantError:
    """max |x - x̂|, Σ (x - x̂)² and Σ x² over all elements, in float64."""
    return _errors(x[None], xh[None])[0]


def _errors(x: np.ndarray, xh: np.ndarray) -> list[QuantError]:
    """_error of each x[b] alone (B, ...): float64 sums, one row per item (a row's pairwise sum is
    that of the row alone, so a batch reports each reference's figures: tests/test_pack.py).

    Rows go ERROR_BLOCK float64 elements at a time (a whole row where one is longer) through one
    buffer (in L2, and no (B, n) float64 array however big the batch), each value made by one ufunc
    that widens as it goes: d = x - x̂, then |d| in place (its max; |d|² is d² exactly), squared in
    place, then x² over it. The values of float64 copies, np.abs(d).max() and np.square(d).sum(),
    bit for bit (tests/test_quantize.py checks them), in ~0.5x the time of that at the 110M shape."""
    B = x.shape[0]
    x2, xh2 = x.reshape(B, -1), xh.reshape(B, -1)  # (B, n)
    rows = max(1, ERROR_BLOCK // max(1, x2.shape[1]))
    buf = np.empty((min(rows, B), x2.shape[1]), np.float64)
    mx, sq, nrm = np.empty(B), np.empty(B), np.empty(B)  # (B,) each
    for lo in range(0, B, rows):
        hi = min(B, lo + rows)
        d = np.subtract(x2[lo:hi], xh2[lo:hi], out=buf[:hi - lo], dtype=np.float64)  # (rows, n)
        np.abs(d, out=d).max(axis=1, initial=0.0, out=mx[lo:hi])
        np.square(d, out=d).sum(axis=1, out=sq[lo:hi])
        np.square(x2[lo:hi], out=d, dtype=np.float64).sum(axis=1, out=nrm[lo:hi])
    return [QuantError(float(mx[b]), float(sq[b]), float(nrm[b])) for b in range(B)]


def _f16_outward(a: "torch.Tensor", up: bool, overflow: str) -> "torch.Tensor":
    """float32 -> float16, rounded up (or down) where rounding to nearest went the other way;
    M3Error(overflow) where a value is beyond float16."""
    import torch

    h = a.to(torch.float16)  # to nearest even, as numpy's astype; beyond 65504: inf
    wrong = h.float() < a if up else h.float() > a
    h = torch.where(wrong, torch.nextafter(h, torch.full((), math.inf if up else -math.inf, dtype=torch.float16)), h)
    if not bool(torch.isfinite(h).all()):
        raise M3Error(overflow)
    return h


def _f16_up(a: "torch.Tensor") -> "torch.Tensor":
    return _f16_outward(a, True, "a quantization group spans more than float16 scales can hold (range > 65504 * "
                                 "qmax); the activations are unusually large: use --quant none")


def _f16_down(a: "torch.Tensor") -> "torch.Tensor":
    return _f16_outward(a, False, "a group minimum is beyond float16 range (|min| > 65504); use --quant none")


@dataclass(frozen=True)
class NoneScheme:
    """Lossless: the values as computed, in their own dtype."""

    dtype: str  # key of _NONE_DTYPES

    @property
    def name(self) -> str:
        return f"none-{self.dtype}"

    def parts(self, shape):
        return (PartSpec("values", _NONE_DTYPES[self.dtype], tuple(shape)),)

    def quantize(self, x):
        q, t = self._encode(x)
        return q, QuantError(0.0, 0.0, float((t.double() ** 2).sum()))

    def quantize_batch(self, x) -> tuple[QuantKV, list[QuantError]]:
        """quantize of each x[b] alone (B, ...), in one pass: a (B, ...) QuantKV, B errors."""
        q, t = self._encode(x)
        return q, [QuantError(0.0, 0.0, float(n)) for n in (t.double() ** 2).flatten(1).sum(1)]

    def _encode(self, x) -> tuple[QuantKV, "torch.Tensor"]:
        """The stored values, and x as the contiguous CPU tensor they came from."""
        import torch

        tdt, ndt = getattr(torch, self.dtype), _NONE_DTYPES[self.dtype]
        t = torch.as_tensor(x)
        if t.dtype != tdt:
            raise M3Error(f"scheme {self.name} stores {self.dtype} losslessly but got {t.dtype}; "
                          f"use scheme none-{str(t.dtype).removeprefix('torch.')} or convert first")
        _to_f32(t)  # the finiteness check
        t = t.detach().cpu().contiguous()  # (..., D)
        raw = t.view(torch.int16).numpy().view(ndt) if tdt == torch.bfloat16 else t.numpy().astype(ndt)
        return QuantKV(self.name, tuple(t.shape), (raw,)), t

    def dequantize(self, q):
        import torch

        (raw,) = q.parts
        if self.dtype == "bfloat16":
            # (..., D) bf16 bits -> f32 bits: bf16 is the top half of a float32
            return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
        return torch.from_numpy(raw.astype(np.float32))

    def bound(self, q):
        import torch

        return torch.zeros(q.shape[:-1] + (1,))  # (..., 1)


@dataclass(frozen=True)
class IntScheme:
    """Uniform B-bit integers per group of G values along D, with a float16 scale (and min)."""

    bits: int  # 4 or 8
    sym: bool  # symmetric absmax (codes centred on 0) or asymmetric min/max
    group: int  # G, values per scale; must divide D

    @property
    def name(self) -> str:
        return f"int{self.bits}-{'sym' if self.sym else 'asym'}-g{self.group}"

    def _check(self, shape):
        d = shape[-1]
        if d % self.group or (self.bits == 4 and self.group % 2):
            raise M3Error(f"scheme {self.name} needs a head dim that is a multiple of {self.group} "
                          f"(and even for int4), but D = {d}; pick a group size that divides {d}, "
                          f"e.g. int{self.bits}-{'sym' if self.sym else 'asym'}-g{math.gcd(d, self.group)}")

    def parts(self, shape):
        self._check(shape)
        *lead, d = shape
        g = (*lead, d // self.group)
        codes = (*lead, d // 2) if self.bits == 4 else tuple(shape)
        cdt = np.dtype("i1") if self.bits == 8 and self.sym else np.dtype("u1")
        specs = (PartSpec("codes", cdt, codes), PartSpec("scales", _SCALE, g))
        return specs if self.sym else specs + (PartSpec("mins", _SCALE, g),)

    def quantize(self, x):
        x = _to_f32(x)
        qkv = self._encode(x)
        return qkv, _error(x, self.dequantize(qkv).numpy())

    def quantize_batch(self, x) -> tuple[QuantKV, list[QuantError]]:
        """quantize of each x[b] alone (B, ...), in one pass: a (B, ...) QuantKV and B errors. Every
        group is quantized on its own, so the codes are those of one-by-one calls, and the errors
        are the same float64 sums (tests/test_pack.py checks both)."""
        x = _to_f32(x)
        qkv = self._encode(x)
        return qkv, _errors(x, self.dequantize(qkv).numpy())

    def _encode(self, x: np.ndarray) -> QuantKV:
        # in torch (a view of x, no copy): its IEEE division, round-half-even and float16 casts give
        # numpy's codes and scales bit for bit (tests/test_quantize.py checks both against numpy),
        # on all threads and without numpy's float temporaries: 0.29x numpy's time at the 110M
        # shape's memories (64 references x 6 layers x 4 heads x 8 tokens x 64 dims, 2 threads)
        import torch

        self._check(x.shape)
        x = x if x.flags.writeable else x.copy()  # torch.from_numpy warns on a read-only array
        xg = torch.from_numpy(x).view(*x.shape[:-1], -1, self.group)  # (..., D/G, G)
        zero = torch.zeros((), dtype=torch.float32)
        if self.sym:
            qmax = 2 ** (self.bits - 1) - 1
            s = _f16_up(xg.abs().amax(-1) / qmax)  # (..., D/G)
            sf = s.float()[..., None]
            q = torch.where(sf > 0, xg / sf, zero).round_().clamp_(-qmax, qmax).to(torch.int8)  # (..., D/G, G)
            mins = None
        else:
            qmax = 2**self.bits - 1
            mins = _f16_down(xg.amin(-1))  # (..., D/G)
            mf = mins.float()[..., None]
            s = _f16_up((xg.amax(-1) - mf[..., 0]) / qmax)  # (..., D/G)
            sf = s.float()[..., None]
            q = torch.where(sf > 0, (xg - mf) / sf, zero).round_().clamp_(0, qmax).to(torch.uint8)  # (..., D/G, G)
            mins = mins.numpy()
        q, s = q.reshape(x.shape).numpy(), s.numpy()  # (..., D), (..., D/G)
        if self.bits == 4:
            u = (q.astype(np.int16) + 8).astype(np.uint8) if self.sym else q  # sym nibbles offset by 8
            q = u[..., 0::2] | (u[..., 1::2] << 4)  # (..., D/2): even d in the low nibble
        return QuantKV(self.name, tuple(x.shape), (q, s) if self.sym else (q, s, mins))

    def dequantize(self, q):
        import torch

        codes, s = q.parts[0], q.parts[1]
        if self.bits == 4:
            lo, hi = codes & 0xF, codes >> 4  # (..., D/2) each
            c = np.stack([lo, hi], -1).reshape(q.shape).astype(np.float32)  # (..., D)
            c = c - 8 if self.sym else c
        else:
            c = codes.astype(np.float32)  # (..., D)
        cg = c.reshape(*q.shape[:-1], -1, self.group)  # (..., D/G, G)
        xh = cg * s.astype(np.float32)[..., None]
        if not self.sym:
            xh = xh + q.parts[2].astype(np.float32)[..., None]
        return torch.from_numpy(np.ascontiguousarray(xh.reshape(q.shape)))  # (..., D)

    def bound(self, q):
        import torch

        return torch.from_numpy(q.parts[1].astype(np.float32) / 2)  # (..., D/G): |x - x̂| <= s/2


# the CLI names; the full name each resolves to is what goes on disk. "none" keeps the compute
# dtype and the int groups follow the head dim, so get_scheme resolves them. G = 16 where it
# divides D (64, 80, 128), else the largest divisor of D below 16 (40 -> 10, 8 -> 8): the
# choice of sym/asym and G is measured in formats/kv-shard.md.
SCHEMES: dict[str, Scheme] = {
    "none": NoneScheme("float32"),
    "int8": IntScheme(bits=8, sym=True, group=16),
    "int4": IntScheme(bits=4, sym=False, group=16),
}
_INT_NAME = re.compile(r"int([48])-(sym|asym)-g([1-9][0-9]*)")


def get_scheme(name: str, dtype: "torch.dtype | None" = None, head_dim: int | None = None, codebooks=None) -> Scheme:
    """The scheme for a CLI name (`none`, `int8`, `int4`) or a full on-disk name (`int8-sym-g16`).

    Args:
        name: a key of SCHEMES, or a full name such as `none-bfloat16` or `int4-asym-g16`.
        dtype: the compute dtype; only used by `none`, which stores values in that dtype.
        head_dim: D; only used by `int8`/`int4`, whose group is the largest divisor of D up to
            SCHEMES' group (even for int4). Full names are taken as they are.

    Example:
        >>> get_scheme("none", torch.bfloat16).name, get_scheme("int8", head_dim=40).name
        ('none-bfloat16', 'int8-sym-g10')
    """
    if name == "vq" or name.startswith("vq-") or name.startswith("vq:"):
        from m3compile.vq import PRESETS as VQ_PRESETS

        if name not in VQ_PRESETS and not (name.startswith("vq:") and len(name) > 3):
            raise M3Error(f"unknown quant scheme {name!r}; vector quantizers are {', '.join(sorted(VQ_PRESETS))} "
                          "or vq:<faiss factory> (a kb made by a newer m3compile may need an upgrade)")
        # vector quantizers carry trained state: the kb's codebooks (m3compile/codebooks.py)
        if codebooks is None:
            raise M3Error(f"quant {name!r} needs the kb's VQ codebooks, which were not given (a kb made by a "
                          "newer m3compile, or its codebooks file is missing)")
        from m3compile.vq import VQScheme

        return VQScheme(codebooks, name)
    if name == "none" and dtype is not None:
        name = "none-" + str(dtype).removeprefix("torch.")
    if name in SCHEMES:
        s = SCHEMES[name]
        if isinstance(s, IntScheme) and head_dim is not None:
            step = 2 if s.bits == 4 else 1
            g = max((g for g in range(step, s.group + 1, step) if head_dim % g == 0), default=s.group)
            s = IntScheme(bits=s.bits, sym=s.sym, group=g)
        return s
    if name.startswith("none-") and name[5:] in _NONE_DTYPES:
        return NoneScheme(name[5:])
    if m := _INT_NAME.fullmatch(name):
        return IntScheme(bits=int(m[1]), sym=m[2] == "sym", group=int(m[3]))
    raise M3Error(f"unknown quant scheme {name!r}; use one of {', '.join(SCHEMES)} or a full name like "
                  "int8-sym-g16, int4-asym-g16, none-bfloat16 (a kb made by a newer m3compile may need an upgrade)")
