"""Vector-quantized memories (m3compile/vq.py): round trip, determinism, serialization, presets, damage."""

import sys

import faiss
import numpy as np
import pytest
import torch

from m3compile import vq
from m3compile.errors import M3Error
from m3compile.pack import decode_payload, encode_payload, encode_payloads
from m3compile.vq import Codebooks, TableDecoder, VQScheme, build_codec, collect_samples, paper_factory, resolve, train_codecs

L, H, K, D = 2, 2, 16, 32


def _samples(seed=0, n=1024):
    # clustered vectors, like memory keys: a few directions plus noise
    centres = np.random.default_rng(0).normal(size=(L, 2, 8, D)).astype(np.float32)  # (L, role, 8, D)
    g = np.random.default_rng(seed)
    out = {}
    for l in range(L):
        for r, role in enumerate("kv"):
            pick = g.integers(0, 8, size=(n, H))  # (N, H)
            out[(l, role)] = centres[l, r][pick] + 0.05 * g.normal(size=(n, H, D)).astype(np.float32)  # (N, H, D)
    return out


@pytest.fixture(scope="module")
def codebooks():
    return train_codecs(_samples(), "PQ8x4", seed=3)


def test_round_trip_error_is_small(codebooks):
    x = torch.from_numpy(np.stack([_samples(seed=1, n=K)[(l, "k")].transpose(1, 0, 2) for l in range(L)]))  # (L, H, K, D)
    scheme = VQScheme(codebooks)
    q, err = scheme.quantize(x, role="k")
    assert q.parts[0].shape == (L, H, K, 4) and q.parts[0].dtype == np.uint8
    assert scheme.name == "vq:PQ8x4" and scheme.parts((L, H, K, D))[0].shape == (L, H, K, 4)
    assert err.rel < 0.2, err.rel  # 8 clusters + 5 % noise: 16 centroids per 4-dim subspace find them
    xh = scheme.dequantize(q, role="k")
    assert torch.allclose(torch.tensor(err.rel), (x - xh).norm() / x.norm(), rtol=1e-4)


@pytest.mark.parametrize("factory, group", [("PQ8x4", "layer"), ("PQ16x8", "layer"), ("PQ4x8", "head"), ("PQ2x8", "layer"), ("OPQ4,PQ4x4", "head"),
                                            ("RQ4x4", "role"), ("LSQ4x4", "layer")])
def test_training_is_deterministic_on_any_thread_count(factory, group):
    # plain PQ trains on FAISS's threads, the rest on one (vq._training_threads): the same bytes on 1, 2, 4
    before = faiss.omp_get_max_threads()
    out = []
    try:
        for threads in (1, 2, 4, 1):
            faiss.omp_set_num_threads(threads)
            out.append(train_codecs(_samples(n=1200), factory, seed=5, group=group, max_train=1200).to_tensors())
            assert faiss.omp_get_max_threads() == threads  # restored after a one-thread (OPQ) training
    finally:
        faiss.omp_set_num_threads(before)
    a = out[0]
    for b in out[1:]:
        assert a[1] == b[1]
        assert sorted(a[0]) == sorted(b[0]) and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])


def test_tensors_round_trip(codebooks):
    tensors, meta = codebooks.to_tensors()
    assert all(t.dtype == np.uint8 and t.ndim == 1 for t in tensors.values())
    assert all(isinstance(v, str) for v in meta.values()) and meta["code_size"] == "4"
    back = Codebooks.from_tensors(tensors, meta)
    assert back.sha256() == codebooks.sha256()
    x = _samples(seed=2, n=64)[(1, "v")][:, 0]  # (N, D)
    c = codebooks.encode(1, "v", x)
    assert np.array_equal(back.encode(1, "v", x), c)
    assert np.array_equal(back.decode(1, "v", c), codebooks.decode(1, "v", c))


def _need_c_lookups():
    # setup.py builds m3compile/_lookup.c (optional, so an install without a compiler still works);
    # CI has a compiler (its strict skips fail this one), and a build that lost the module would
    # silently decode ~2x slower
    if vq._lookup is None:
        pytest.skip("m3compile._lookup was not built (no C compiler at install): numpy's take decodes")


def test_table_lookups_in_c_are_built():
    _need_c_lookups()
    assert TableDecoder.native
    table = np.arange(3 * 256 * 2, dtype=np.float32).reshape(3 * 256, 2)  # (C*256, row)
    codes = np.array([[0, 255, 7], [1, 2, 3]], np.uint8)  # (N, C)
    out = np.empty((2, 6), np.float32)
    vq._lookup.take_rows(table, codes, out, 3, 8)
    assert np.array_equal(out.reshape(2, 3, 2), table[np.arange(3) * 256 + codes])
    for args, what in [((table[:-1], codes, out, 3, 8), "table holds"), ((table, codes[:, :2].copy(), out, 3, 8), "whole vectors"),
                       ((table, codes, out[:1], 3, 8), "out holds"), ((table, codes, out, 3, 0), "positive"),
                       ((table, codes, out, 2**62, 8), "addressable")]:
        with pytest.raises(ValueError, match=what):
            vq._lookup.take_rows(*args)
    with pytest.raises((TypeError, ValueError, BufferError)):
        vq._lookup.take_rows(table, codes, out.T, 3, 8)  # not contiguous
    with pytest.raises(TypeError):
        vq._lookup.take_rows(table, codes, b"read-only", 3, 8)


@pytest.fixture(params=["c", "numpy"])
def lookups(request, monkeypatch):
    """TableDecoder's two paths: the C lookups (where built) and numpy's take."""
    if request.param == "c":
        _need_c_lookups()
    monkeypatch.setattr(TableDecoder, "native", request.param == "c")
    return request.param


@pytest.mark.parametrize("factory,d", [("PQ16x8", D), ("PQ8x4", D), ("PQ32x4", D), ("PQ4x8", D), ("PQ12x8", 24),
                                       ("PQ32x8", D), ("PQ16x4", D), ("PQ2x8", D), ("PQ8x8", 24)])
def test_table_decoder_gives_faiss_floats(factory, d, lookups):
    # the fast path of Codebooks.decode must return exactly what FAISS's own sa_decode returns, at
    # every row size the C loop has a case for (bytes a row: PQ32x8 4, PQ16x8 and PQ32x4 8, PQ16x4 16,
    # PQ8x4 and PQ4x8 32, PQ2x8 64; PQ8x8 at d 24: 12, the general loop) and code bytes not a
    # multiple of its eight (PQ12x8)
    x = _samples(seed=4, n=700)[(0, "k")].reshape(-1, D)  # (N, D)
    codec = build_codec(factory, d)
    codec.train(x[:, :codec.d])
    codes = codec.sa_encode(x[:, :codec.d])  # (N, C)
    fast = TableDecoder.of(codec)
    assert fast is not None
    assert np.array_equal(fast(codes), codec.sa_decode(codes))
    assert np.array_equal(fast(codes[:0]), codec.sa_decode(codes[:0]))


def test_table_decoder_shares_a_large_batch_among_faiss_threads(monkeypatch):
    # a batch of at least PARALLEL_BYTES code bytes is cut into one contiguous part a FAISS OpenMP
    # thread, each copied by C in a pool thread: the floats of one call, also in a forked child
    # (whose pool is its own: its parent's threads do not survive the fork)
    import os
    import threading

    _need_c_lookups()
    x = _samples(seed=6, n=400)[(1, "k")].reshape(-1, D)  # (N, D)
    codec = build_codec("PQ16x8", D)
    codec.train(x)
    codes = codec.sa_encode(x)  # (N, C)
    want = codec.sa_decode(codes)
    fast = TableDecoder.of(codec)
    calls = []
    take = vq._lookup.take_rows

    class Spy:  # the module's take_rows, counted by the thread it ran in
        @staticmethod
        def take_rows(*args):
            calls.append((threading.current_thread().name, len(args[1])))
            return take(*args)

    monkeypatch.setattr(vq, "_lookup", Spy)
    monkeypatch.setattr(TableDecoder, "PARALLEL_BYTES", 64)
    monkeypatch.setattr(faiss, "omp_get_max_threads", lambda: 3)  # what OMP_NUM_THREADS=3 would say
    assert np.array_equal(fast(codes), want)
    assert sorted(n for _, n in calls) == sorted(len(codes) * i // 3 - len(codes) * (i - 1) // 3 for i in (1, 2, 3))
    assert all(name.startswith("m3-decode") for name, _ in calls)
    calls.clear()
    assert np.array_equal(fast(codes[:3]), want[:3]) and calls == [(threading.current_thread().name, 3)]  # under 64 bytes
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 if it decodes the same floats (a pool inherited hangs: 20 s alarm)
            import signal

            signal.alarm(20)
            os._exit(0 if vq._Pool._pool is None and np.array_equal(fast(codes), want) else 1)
        assert os.waitpid(pid, 0)[1] == 0
    monkeypatch.setattr(faiss, "omp_get_max_threads", lambda: 1)
    calls.clear()
    assert np.array_equal(fast(codes), want) and len(calls) == 1  # one thread: no pool


@pytest.mark.parametrize("factory", ["PQ8x4", "PQ16x8"])
def test_table_decoder_blocks_threads_pickle_and_byte_order(factory, lookups, monkeypatch):
    # the same floats across block edges, for every code byte value, after a pickle round trip
    # (Ray, process pools) and on the path of a big-endian machine; each thread its own index buffer
    import pickle
    import threading

    x = _samples(seed=5, n=1200)[(0, "v")].reshape(-1, D)  # (N, D)
    assert len(x) > 2 * TableDecoder.BLOCK
    codec = build_codec(factory, D)
    codec.train(x)
    codes = codec.sa_encode(x)  # (N, C)
    want = codec.sa_decode(codes)
    fast = TableDecoder.of(codec)
    if lookups == "c":  # threads decoding at once (the GIL is released while C copies)
        got = [None] * 4
        workers = [threading.Thread(target=lambda i=i: got.__setitem__(i, fast(codes[i::4]))) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert all(np.array_equal(g, want[i::4]) for i, g in enumerate(got))
    small, block = TableDecoder.SMALL, TableDecoder.BLOCK
    for n in (1, small, small + 1, block - 1, block, block + 1, len(codes)):
        assert np.array_equal(fast(codes[:n]), want[:n]), n
    assert np.array_equal(fast(codes[::-1]), want[::-1])  # a strided view
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], codes.shape[1], axis=1)  # (256, C): each byte value
    for n in (small, 256):
        assert np.array_equal(fast(every[:n]), codec.sa_decode(every[:n])), n
    assert np.array_equal(pickle.loads(pickle.dumps(fast))(codes), want)
    mine = fast._index()
    other = []
    t = threading.Thread(target=lambda: other.append(fast._index()))
    t.start()
    t.join()
    assert other[0][0] is not mine[0] and fast._index()[0] is mine[0]
    assert TableDecoder.of(codec)._index()[0] is mine[0]  # shared by decoders of as many code bytes
    monkeypatch.setattr(sys, "byteorder", "big")  # numpy's path only: the C loop's is fixed when compiled
    assert np.array_equal(fast(codes), want)
    swapped = pickle.loads(pickle.dumps(fast))
    swapped.table = swapped.table.astype(swapped.table.dtype.newbyteorder())  # a table from a machine of the other order
    assert np.array_equal(swapped(codes), want)


@pytest.mark.parametrize("factory", ["RQ4x4", "OPQ4,PQ4x4", "PQ4x6", "PQ3x4"])
def test_other_codecs_decode_through_faiss(factory):
    d = 24 if factory == "PQ3x4" else D
    codec = build_codec(factory, d)
    assert TableDecoder.of(codec) is None
    cb = train_codecs({(0, "k"): _samples(n=300)[(0, "k")][..., :d], (0, "v"): _samples(n=300)[(0, "v")][..., :d]},
                      factory, seed=1, max_train=300)
    x = _samples(seed=2, n=50)[(0, "k")][:, 0, :d]  # (N, d)
    c = cb.encode(0, "k", x)
    assert np.array_equal(cb.decode(0, "k", c), cb.codecs["l0.k"].sa_decode(c))


def test_payload_round_trip(codebooks):
    # the pack.py role keyword: keys and values go through their own codecs
    s = _samples(seed=4, n=K)
    k = np.stack([s[(l, "k")].transpose(1, 0, 2) for l in range(L)])  # (L, H, K, D)
    v = np.stack([s[(l, "v")].transpose(1, 0, 2) for l in range(L)])  # (L, H, K, D)
    pos = np.broadcast_to(np.arange(K), (L, H, K))  # (L, H, K)
    scheme = VQScheme(codebooks)
    frame, err = encode_payload(k, v, pos, scheme)
    kh, vh, ph = decode_payload(frame, scheme, max_bytes=1 << 20)
    assert torch.equal(kh, scheme.dequantize(scheme.quantize(k, "k")[0], "k"))
    assert torch.equal(vh, scheme.dequantize(scheme.quantize(v, "v")[0], "v"))
    assert torch.equal(ph, torch.from_numpy(pos.astype(np.int64))) and err.rel < 0.2


def test_collect_samples_shapes():
    mem = type("M", (), {"keys": torch.zeros(L, H, K, D), "values": torch.ones(L, H, K, D)})
    s = collect_samples([mem, mem])
    assert sorted(s) == [(0, "k"), (0, "v"), (1, "k"), (1, "v")] and s[(1, "v")].shape == (2 * K, H, D)


def test_collect_samples_past_its_cap_draws_from_the_whole_sample():
    # it took the first memories up to the cap: codebooks of the first half of a corpus at top-k 64
    mems = [type("M", (), {"keys": torch.full((L, H, K, D), float(i)), "values": torch.zeros(L, H, K, D)})
            for i in range(40)]
    s = collect_samples(mems, max_vectors=5 * K, seed=3)
    picked = s[(0, "k")][::K, 0, 0].tolist()  # each memory's value, one per K rows
    assert len(picked) == 5 and picked == sorted(picked) and max(picked) >= 10
    assert picked == collect_samples(mems, max_vectors=5 * K, seed=3)[(0, "k")][::K, 0, 0].tolist()
    assert picked != collect_samples(mems, max_vectors=5 * K, seed=4)[(0, "k")][::K, 0, 0].tolist()
    assert collect_samples(mems, max_vectors=40 * K)[(0, "k")].shape[0] == 40 * K  # under the cap: all


# the bits per element each preset is documented at (vq.PRESETS' comments, formats/vq-codebooks.md):
# code bytes x 8 / D at each head dim here (every one divides them), and the codebooks' grouping
PRESET_BITS = {"vq": 4, "vq-grid": 4, "vq-pq8-4bit": 4, "vq-pq4-4bit": 4, "vq-pq4-2bit": 2, "vq-pq4": 1,
               "vq-pq4-half": 0.5, "vq-pq8": 1, "vq-rq4": 1, "vq-rq8": 1, "vq-lsq8": 1}
PRESET_GROUPS = {"vq-paper": "all", "vq-rq4": "role"}  # the rest: per layer


@pytest.mark.parametrize("d", [8, 32, 80])
@pytest.mark.parametrize("preset", [*PRESET_BITS, "vq-paper"])
def test_presets_resolve(preset, d):
    factory, group = resolve(preset, d)
    codec = build_codec(factory, d)
    assert codec.d == d and group == PRESET_GROUPS.get(preset, "layer")
    bits = codec.sa_code_size() * 8 / d
    if preset == "vq-paper":  # the paper's 14 bytes at its D = 80 (§4.2); scaled as vq.paper_factory says
        assert bits == {8: 6, 32: 1.5, 80: 1.4}[d], factory
    elif (preset, d) == ("vq-pq4-half", 8):  # PQ1x4: one 4-bit code, stored in a whole byte
        assert bits == 1, factory
    else:
        assert bits == PRESET_BITS[preset], factory
    assert set(PRESET_BITS) | {"vq-paper"} == set(vq.PRESETS)  # a new preset gets a documented rate here


def test_paper_preset():
    assert resolve("vq-paper", 80)[0] == "OPQ20_80,Residual2x14,PQ8x10"
    assert build_codec(paper_factory(80), 80).sa_code_size() == 14
    assert resolve("vq:OPQ4,PQ4x8", 32) == ("OPQ4,PQ4x8", "layer")
    with pytest.raises(M3Error, match="vq-fancy"):
        resolve("vq-fancy", 32)
    with pytest.raises(M3Error, match="PQ7x4"):
        build_codec("PQ7x4", 32)


def test_damaged_codebook_is_named(codebooks):
    tensors, meta = codebooks.to_tensors()
    bad = dict(tensors)
    bad["codec.l1.k"] = bad["codec.l1.k"].copy()
    bad["codec.l1.k"][-5] ^= 0xFF
    with pytest.raises(M3Error, match=r"codebooks.safetensors: tensor codec.l1.k does not match its sha256"):
        Codebooks.from_tensors(bad, meta, where="codebooks.safetensors")
    del bad["codec.l0.v"]
    with pytest.raises(M3Error, match="codec.l0.v is missing"):
        Codebooks.from_tensors(bad, meta)
    with pytest.raises(M3Error, match="not m3 VQ codebooks"):
        Codebooks.from_tensors(tensors, {**meta, "format": "other"})


def test_a_frame_depends_on_its_reference_alone():
    """LSQ encodes from seeded random codes drawn for the whole call, so codes depend on what one
    call holds; a compile must encode one reference per call, also when it batches references
    (pack.encode_payloads), or a resumed or incremental compile would not give the same bytes."""
    scheme = VQScheme(train_codecs(_samples(), "LSQ4x4", seed=2, max_train=600))
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(5, L, H, K, D, generator=g), torch.randn(5, L, H, K, D, generator=g)
    pos = torch.arange(K).expand(5, L, H, K)
    batched = encode_payloads(keys, values, pos, scheme)
    alone = [encode_payload(keys[b], values[b], pos[b], scheme) for b in (4, 2, 0, 1, 3)]
    assert [f for f, _ in batched] == [alone[i][0] for i in (2, 3, 1, 4, 0)]
    x = keys[0, 0].reshape(-1, D).numpy()
    together = scheme.codebooks.encode(0, "k", np.concatenate([keys[1, 0].reshape(-1, D).numpy(), x]))
    assert not np.array_equal(together[-len(x):], scheme.codebooks.encode(0, "k", x)), \
        "LSQ no longer depends on the call: this test no longer guards anything"


@pytest.mark.parametrize("factory, group, batched", [("PQ16x8", "layer", True), ("PQ8x4", "head", True),
                                                     ("PQ2x8", "layer", False), ("RQ4x4", "layer", False),
                                                     ("LSQ4x4", "layer", False)])
def test_a_batch_encodes_to_the_frames_of_its_references_alone(factory, group, batched):
    """A plain PQ with subvectors under 16 dims encodes a batch of references in one call per codec
    (VQScheme.quantize_batch): the frames and errors equal one-reference calls'; the others say so."""
    scheme = VQScheme(train_codecs(_samples(n=1200), factory, seed=2, group=group, max_train=1200))
    assert scheme.batch_encode is batched
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(6, L, H, K, D, generator=g), torch.randn(6, L, H, K, D, generator=g)
    pos = torch.arange(K).expand(6, L, H, K)
    got = encode_payloads(keys, values, pos, scheme)
    alone = [encode_payload(keys[b], values[b], pos[b], scheme) for b in range(6)]
    assert [f for f, _ in got] == [f for f, _ in alone]
    assert [e for _, e in got] == [e for _, e in alone]  # the same float64 sums
    if batched:
        q, errs = scheme.quantize_batch(keys, role="k")
        assert q.parts[0].shape == (6, L, H, K, scheme.codebooks.code_size) and len(errs) == 6


@pytest.mark.parametrize("factory, encoder", [("PQ16x8", "grid"), ("PQ8x4", "faiss"), ("RQ4x4", "faiss")])
def test_the_training_samples_error_is_each_references_own(factory, encoder):
    """codebooks.train's baseline error (the drift reports' reference) quantizes its sample in
    batches where the codec allows: each memory's error equals quantizing it alone, memories of
    other shapes (a short reference keeps fewer tokens) included, in the sample's order."""
    from types import SimpleNamespace

    from m3compile.codebooks import _sample_errors

    scheme = VQScheme(train_codecs(_samples(n=1200), factory, seed=2, max_train=1200, encoder=encoder))
    g = torch.Generator().manual_seed(4)
    mems = [SimpleNamespace(keys=torch.randn(L, H, k, D, generator=g), values=torch.randn(L, H, k, D, generator=g))
            for k in (K, K, 5, K, 5, K)]
    alone = []
    for m in mems:
        _, ek = scheme.quantize(m.keys, role="k")
        _, ev = scheme.quantize(m.values, role="v")
        alone.append(ek.merge(ev).rel)
    assert _sample_errors(scheme, mems) == alone
    assert len(set(alone)) == len(alone)  # distinct memories: an order mix-up would show


def test_the_grid_encoder_gives_faiss_codes_but_near_borders():
    """vq-grid (the default) encodes each 2-dim subvector by its cell's code: FAISS's exact codes
    for most subvectors, and where not, a centroid at most a cell's diagonal farther."""
    g = np.random.default_rng(7)
    x = (g.standard_t(4, size=(30000, 40)) @ g.normal(size=(40, 40)) / 6).astype(np.float32)  # heavy tails, correlated
    exact = train_codecs({(0, "k"): x[:10000], (0, "v"): x[:10000]}, "PQ20x8", seed=1, max_train=10000)
    grid = train_codecs({(0, "k"): x[:10000], (0, "v"): x[:10000]}, "PQ20x8", seed=1, max_train=10000, encoder="grid")
    test = x[10000:]
    a, b = exact.encode(0, "k", test), grid.encode(0, "k", test)
    assert a.shape == b.shape == (20000, 20) and b.dtype == np.uint8
    assert 0.5 < (a == b).mean() < 1.0, (a == b).mean()  # not all: the test would not see the border
    assert (a == b).mean() > 0.85
    da, db = exact.decode(0, "k", a), grid.decode(0, "k", b)
    assert np.array_equal(exact.decode(0, "k", b), db)  # the same codecs: only the encoder differs
    sq_a, sq_b = ((test - da) ** 2).reshape(-1, 20, 2).sum(-1), ((test - db) ** 2).reshape(-1, 20, 2).sum(-1)
    assert (sq_b >= sq_a - 1e-5).all()  # FAISS's codes are the nearest centroids
    enc = grid._encoders["l0.k"]
    inside = (((test - enc.lo) * enc.scale >= 0) & ((test - enc.lo) * enc.scale < enc.GRID)).reshape(-1, 20, 2).all(-1)
    diagonal = np.hypot(*(1 / enc.scale).reshape(20, 2).T)  # (M,)
    excess = np.sqrt(sq_b) - np.sqrt(sq_a)
    assert (excess[inside] <= np.broadcast_to(diagonal, excess.shape)[inside] * 1.001 + 1e-6).all()
    assert sq_b.sum() / sq_a.sum() < 1.03  # a few percent more squared error at most
    # the encoder is recorded: codebooks round-trip as version 2, exact ones stay version 1
    tensors, meta = grid.to_tensors()
    assert meta["encoder"] == "grid" and meta["format_version"] == "2"
    assert "encoder" not in exact.to_tensors()[1] and exact.to_tensors()[1]["format_version"] == "1"
    back = Codebooks.from_tensors(tensors, meta)
    assert back.encoder == "grid" and np.array_equal(back.encode(0, "k", test), b) and back.sha256() == grid.sha256()
    with pytest.raises(M3Error, match="encoder 'lattice'"):
        Codebooks.from_tensors(tensors, {**meta, "encoder": "lattice"})
    with pytest.raises(M3Error, match="grid encoder needs a plain PQ .* IndexPQ with 4-dim subvectors"):
        train_codecs({(0, "k"): x[:2000], (0, "v"): x[:2000]}, "PQ10x8", seed=1, encoder="grid")
    # far outside the range a subvector takes the nearest edge cell's code, on any machine (no int32 overflow)
    top, bottom = (enc.lo + (enc.GRID - 0.5) / enc.scale)[None], (enc.lo + 0.5 / enc.scale)[None]  # (1, 40)
    far = np.concatenate([np.full((1, 40), 1e30, np.float32), np.full((1, 40), -1e30, np.float32)])
    assert np.array_equal(grid.encode(0, "k", far), grid.encode(0, "k", np.concatenate([top, bottom])))
