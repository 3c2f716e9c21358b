"""quantize.py: lossless `none`, the analytic error bounds of the int schemes, and the names."""

import struct
import warnings

import numpy as np
import pytest
import torch

from m3compile.errors import M3Error
from m3compile.quantize import SCHEMES, IntScheme, QuantError, get_scheme

INT_NAMES = ["int8-sym-g16", "int8-asym-g16", "int8-sym-g80", "int4-asym-g16", "int4-sym-g16", "int4-asym-g8"]


def keys_like(seed=0, shape=(3, 2, 8, 80)):
    """Gaussian channels of varied scale plus a few large same-sign channels, like real keys."""
    g = torch.Generator().manual_seed(seed)
    std = torch.exp(torch.randn(shape[:2] + (1, shape[-1]), generator=g) * 0.5)  # (L, H, 1, D)
    x = torch.randn(shape, generator=g) * std
    x[..., 37] += 12.0
    x[..., 75] -= 7.0
    return x


def test_none_is_bit_exact_for_float32_bfloat16_float16():
    x = keys_like()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        fi = torch.finfo(dtype)
        xd[0, 0, 0, :4] = torch.tensor([-0.0, fi.tiny / 4, fi.max, -fi.max])  # signed zero, subnormal, extremes
        s = get_scheme("none", dtype)
        assert s.name == f"none-{str(dtype)[6:]}"
        q, err = s.quantize(xd)
        back = s.dequantize(q)
        assert back.dtype == torch.float32 and back.shape == x.shape
        assert torch.equal(back.view(torch.int32), xd.float().view(torch.int32)), dtype
        assert err.max_abs == 0 and err.rel == 0
    # numpy float32 input as well
    q, _ = get_scheme("none-float32").quantize(x.numpy())
    assert torch.equal(get_scheme("none-float32").dequantize(q).view(torch.int32), x.view(torch.int32))


def test_none_refuses_another_dtype():
    with pytest.raises(M3Error, match="none-bfloat16"):
        get_scheme("none-float32").quantize(torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16))


def _group_err(x, xh, group):
    return (x - xh).abs().reshape(*x.shape[:-1], -1, group).amax(-1)  # (..., D/G)


@pytest.mark.parametrize("name", INT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_error_within_analytic_bound(name, dtype):
    s = get_scheme(name)
    x = keys_like(1).to(dtype)
    q, err = s.quantize(x)
    xf = x.float()
    xh = s.dequantize(q)
    scale = torch.from_numpy(q.parts[1].astype(np.float32))  # (..., D/G) stored float16 scales
    xg = xf.reshape(*x.shape[:-1], -1, s.group)  # (..., D/G, G)
    # the scale is the smallest float16 at or above range/levels, so no value is clipped
    levels = 2 ** (s.bits - 1) - 1 if s.sym else 2**s.bits - 1
    if s.sym:
        need = xg.abs().amax(-1) / levels
    else:
        mins = torch.from_numpy(q.parts[2].astype(np.float32))
        assert (mins <= xg.amin(-1)).all()
        need = (xg.amax(-1) - mins) / levels
    assert (scale >= need).all()
    below = torch.from_numpy(np.nextafter(q.parts[1], np.float16(0)).astype(np.float32))
    assert (below < need * (1 + 1e-6)).all(), "scale is not the tightest float16"
    # |x - x̂| <= s/2, plus float32 rounding of the arithmetic
    slack = 4 * torch.finfo(torch.float32).eps * xg.abs().amax(-1)
    assert (_group_err(xf, xh, s.group) <= scale / 2 + slack).all()
    assert torch.equal(s.bound(q), scale / 2)
    # the reported error is the error
    d = (xf - xh).double()
    assert err.max_abs == pytest.approx(d.abs().max().item())
    assert err.rel == pytest.approx((d.norm() / xf.double().norm()).item(), rel=1e-6)
    # and about what uniform rounding predicts, scale^2/12 per element; sym rounds a group's
    # small values to an exact 0, so it may do better, never much worse
    predicted = (scale.double() ** 2 / 12).sum().item() * s.group
    assert 0.5 * predicted < err.sq_err < 1.2 * predicted


def _numpy_int_codes(x: np.ndarray, bits: int, sym: bool, group: int):
    """The int schemes' codes and float16 scales (and mins) by the rule of quantize.py's docstring,
    in numpy: an independent oracle for IntScheme's torch arithmetic."""
    xg = x.reshape(*x.shape[:-1], -1, group)  # (..., D/G, G)

    def f16(a, up):
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        wrong = h.astype(np.float32) < a if up else h.astype(np.float32) > a
        h[wrong] = np.nextafter(h[wrong], np.float16(np.inf if up else -np.inf))
        return h

    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = f16(np.abs(xg).max(-1) / qmax, up=True)
        sf = s.astype(np.float32)[..., None]
        q = np.clip(np.rint(np.divide(xg, sf, out=np.zeros_like(xg), where=sf > 0)), -qmax, qmax).astype(np.int8)
        return q.reshape(x.shape), s, None
    qmax = 2**bits - 1
    m = f16(xg.min(-1), up=False)
    mf = m.astype(np.float32)[..., None]
    s = f16((xg.max(-1) - mf[..., 0]) / qmax, up=True)
    sf = s.astype(np.float32)[..., None]
    q = np.clip(np.rint(np.divide(xg - mf, sf, out=np.zeros_like(xg), where=sf > 0)), 0, qmax).astype(np.uint8)
    return q.reshape(x.shape), s, m


@pytest.mark.parametrize("block", [1 << 16, 5 * 2 * 8 * 80, 1])  # _errors: 1 block of 12 items, 3 (5+5+2), 12
@pytest.mark.parametrize("name", INT_NAMES)
def test_int_codes_match_a_numpy_oracle(name, block, monkeypatch):
    """IntScheme computes in torch; its codes, scales, mins and float64 errors are those of the
    rule computed in numpy, bit for bit, on inputs with ties, zeros, subnormals and wide ranges."""
    monkeypatch.setattr("m3compile.quantize.ERROR_BLOCK", block)
    s = get_scheme(name)
    g = np.random.default_rng(7)
    x = np.concatenate([keys_like(2, (4, 2, 8, 80)).numpy(),
                        (g.standard_normal((4, 2, 8, 80)) * 10.0 ** g.integers(-6, 4, (4, 2, 8, 1))),
                        g.integers(-300, 300, (4, 2, 8, 80)) / 2.0]).astype(np.float32)  # (12, 2, 8, 80)
    x[0, 0, 0, :16] = 0.0
    x[0, 0, 1, :16] = -0.0
    x[0, 0, 2, :16] = np.float32(1e-42)  # subnormal float32: the scale rounds up to float16's smallest
    x[11] = 0.0  # an item quantized exactly: its max error is +0.0, not -0.0
    q, errs = s.quantize_batch(x)
    codes, scales, mins = _numpy_int_codes(x, s.bits, s.sym, s.group)
    if s.bits == 4:
        u = (codes.astype(np.int16) + 8).astype(np.uint8) if s.sym else codes
        codes = u[..., 0::2] | (u[..., 1::2] << 4)
    assert np.array_equal(q.parts[0], codes) and q.parts[0].dtype == codes.dtype
    assert np.array_equal(q.parts[1].view(np.uint16), scales.view(np.uint16))
    if not s.sym:
        assert np.array_equal(q.parts[2].view(np.uint16), mins.view(np.uint16))
    ro = x[:1].copy()
    ro.flags.writeable = False  # e.g. np.frombuffer's: quantized as it is, without torch's warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(s.quantize(ro[0])[0].parts[0], q.parts[0][0])
    xh = s.dequantize(q).numpy().astype(np.float64)
    for b, e in enumerate(errs):  # the float64 sums of quantize's _error, exactly
        d = x[b].astype(np.float64) - xh[b]
        want = (float(np.abs(d).max()), float((d * d).sum()), float((x[b].astype(np.float64) ** 2).sum()))
        assert struct.pack("<3d", e.max_abs, e.sq_err, e.sq_norm) == struct.pack("<3d", *want)  # bits, and the sign of 0


def test_int4_nibble_order_and_asym_codes():
    # 0..15 in one group: min 0, scale 1, codes 0..15; even d in the low nibble
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16)
    q, err = get_scheme("int4-asym-g16").quantize(x)
    codes, scales, mins = q.parts
    assert codes.dtype == np.uint8 and codes.tolist() == [[[[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]]]
    assert scales.tolist() == [[[[1.0]]]] and mins.tolist() == [[[[0.0]]]]
    assert err.max_abs == 0


def test_int8_sym_codes_and_scale():
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0], x[..., 1], x[..., 2] = 127.0, -63.5, 0.49  # absmax 127 -> scale exactly 1
    q, _ = get_scheme("int8-sym-g16").quantize(x)
    codes, scales = q.parts
    assert codes.dtype == np.int8 and codes[0, 0, 0, :3].tolist() == [127, -64, 0]  # round half to even
    assert scales.dtype == np.float16 and scales.item() == 1.0


def test_degenerate_groups():
    x = torch.zeros(2, 1, 2, 16)
    x[1] = 0.1  # constant group: min is not a float16, so asym rounds it down and keeps a scale
    for name in INT_NAMES[:2] + ["int4-asym-g16", "int4-sym-g16"]:
        s = get_scheme(name)
        q, err = s.quantize(x)
        xh = s.dequantize(q)
        assert torch.equal(xh[0], x[0]), name  # all-zero groups come back exactly
        assert (x[1] - xh[1]).abs().max() <= s.bound(q)[1].max() + 1e-8, name


def test_bad_inputs_are_refused():
    s = get_scheme("int8")
    x = torch.zeros(1, 1, 1, 16)
    x[0, 0, 0, 3] = float("nan")
    with pytest.raises(M3Error, match="NaN or inf"):
        s.quantize(x)
    with pytest.raises(M3Error, match="float16"):
        s.quantize(torch.full((1, 1, 1, 16), 1e9))
    with pytest.raises(M3Error, match="D = 24.*int8-sym-g8"):
        s.quantize(torch.zeros(1, 1, 1, 24))


def test_scheme_names():
    assert {n: s.name for n, s in SCHEMES.items()} == {
        "none": "none-float32", "int8": "int8-sym-g16", "int4": "int4-asym-g16"}
    for name in ["none-bfloat16", "none-float16", "int8-asym-g8", "int4-sym-g40", *INT_NAMES]:
        assert get_scheme(name).name == name  # the on-disk name rebuilds its scheme
    assert get_scheme("int4-asym-g32") == IntScheme(bits=4, sym=False, group=32)
    assert get_scheme("int8", torch.bfloat16).name == "int8-sym-g16"  # dtype only matters for none
    # with the head dim, the CLI names take the largest group up to 16 that divides it
    for d, g8, g4 in [(80, 16, 16), (128, 16, 16), (40, 10, 10), (8, 8, 8), (24, 12, 12), (9, 9, 16)]:
        assert get_scheme("int8", head_dim=d).name == f"int8-sym-g{g8}"
        assert get_scheme("int4", head_dim=d).name == f"int4-asym-g{g4}"
    assert get_scheme("int8-sym-g80", head_dim=40).name == "int8-sym-g80"  # full names are taken as given
    for bad in ["int3-sym-g16", "int8-sym-g0", "int8-sym", "vq-OPQ20_80", "none-float64", "INT8"]:
        with pytest.raises(M3Error, match="unknown quant scheme"):
            get_scheme(bad)


def test_error_merge():
    a, b = QuantError(0.5, 1.0, 4.0), QuantError(0.25, 3.0, 12.0)
    m = a.merge(b)
    assert (m.max_abs, m.sq_err, m.sq_norm) == (0.5, 4.0, 16.0)
    assert m.rel == pytest.approx(0.5)
    assert QuantError(0.0, 0.0, 0.0).rel == 0.0
