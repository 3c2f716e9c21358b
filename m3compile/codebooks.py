"""The codebooks of a vector-quantized kb as a kb artefact (formats/vq-codebooks.md): trained on a
seeded sample of the kb's own memories (made by memorize, the compile's recipe), written as one
content-addressed safetensors file `codebooks-<16 hex>.safetensors` beside the shards, named in
the manifest (`quant.vq`) with its sha256, and part of every frame's content key through
MemorySpec.codebooks_sha256. The codecs themselves are m3compile/vq.py's.
"""

import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from safetensors import safe_open

from m3compile import vq
from m3compile.errors import M3Error
from m3compile.pack import _fsync_replace, _write_safetensors
from m3compile.spec import MemorySpec, memorize

PREFIX = "codebooks-"
FIX = ("compile with --rebuild --retrain-codebooks to train them again (from the same corpus and seed they come "
       "out the same and every memory that checks is copied; otherwise every memory is encoded again), or restore "
       "the file")


def is_vq(quant: str) -> bool:
    return quant == "vq" or quant.startswith("vq-") or quant.startswith("vq:")


def resolve_quant(name: str, head_dim: int) -> str:
    """The name a kb records: a concrete preset (`vq` is whichever preset is the default now) or
    `vq:<factory>`; refuses a name or factory FAISS cannot build for this head dim."""
    if name == "vq":
        name = vq.default_preset()
    factory, _ = vq.resolve(name, head_dim)
    vq.build_codec(factory, head_dim)
    return name


def sample_references(token_lists: Iterable[Sequence[int]], n: int, seed: int) -> list[list[int]]:
    """A seeded uniform sample (reservoir) of n references, in corpus order: what codebooks train on."""
    rng, kept = random.Random(f"m3-codebooks/{seed}"), []
    for i, ids in enumerate(token_lists):
        if len(kept) < n:
            kept.append((i, list(ids)))
        else:
            j = rng.randrange(i + 1)
            if j < n:
                kept[j] = (i, list(ids))
    return [ids for _, ids in sorted(kept)]


def train(model, token_lists: list[list[int]], spec: MemorySpec, seed: int, batch_size: int = 16):
    """Codebooks for `spec`'s vq scheme, trained on the memories of `token_lists`. Returns them and
    the mean relative quantization error they give on that sample (the baseline of drift reports)."""
    mems = []
    for i in range(0, len(token_lists), batch_size):
        mems += memorize(model, token_lists[i:i + batch_size], spec)
    if not mems:
        raise M3Error("no references to train VQ codebooks on; the corpus is empty")
    factory, group = vq.resolve(spec.quant, spec.head_dim)
    cb = vq.train_codecs(vq.collect_samples(mems, seed=seed), factory, seed, group, encoder=vq.ENCODERS.get(spec.quant, "faiss"))
    return cb, float(np.mean(_sample_errors(vq.VQScheme(cb, spec.quant), mems)))


def _sample_errors(scheme: "vq.VQScheme", mems) -> list[float]:
    """Each memory's relative quantization error (keys and values together), in `mems`' order.

    Where a call's codes are each vector's own (`batch_encode`), memories of one shape are
    quantized in one call per codec (`quantize_batch`: the same codes and float64 error sums as one
    reference at a time, tests/test_vq.py); otherwise one memory at a time."""
    import torch  # here, not at the top: reading codebooks (m3 inspect) needs no torch

    errs: list[float] = [0.0] * len(mems)
    if not scheme.batch_encode:
        for i, m in enumerate(mems):
            _, ek = scheme.quantize(m.keys, role="k")
            _, ev = scheme.quantize(m.values, role="v")
            errs[i] = ek.merge(ev).rel
        return errs
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mems):
        by_shape.setdefault(tuple(m.keys.shape), []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), 256):  # bounded stacks: (256, L, H, K, D) at a time
            part = idx[s:s + 256]
            _, ek = scheme.quantize_batch(torch.stack([mems[i].keys for i in part]), role="k")
            _, ev = scheme.quantize_batch(torch.stack([mems[i].values for i in part]), role="v")
            for i, k, v in zip(part, ek, ev, strict=True):
                errs[i] = k.merge(v).rel
    return errs


def write(kb_dir: Path, cb: "vq.Codebooks") -> dict:
    """Write the codebooks file (deterministic bytes, atomically); returns its manifest entry."""
    tensors, meta = cb.to_tensors()
    sha = cb.sha256()
    name = f"{PREFIX}{sha[:16]}.safetensors"
    final, tmp = Path(kb_dir) / name, Path(kb_dir) / f".{name}.tmp"
    try:
        _write_safetensors(tmp, [(k, "U8", [int(v.size)], [v.tobytes()]) for k, v in sorted(tensors.items())], meta)
        if not final.is_file() or final.read_bytes() != tmp.read_bytes():  # absent, or damaged under its name
            _fsync_replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {"path": name, "sha256": sha, "factory": cb.factory, "group": cb.group, "code_size": cb.code_size,
             "seed": cb.seed, "codebook_bytes": final.stat().st_size}
    if cb.encoder != "faiss":  # absent: FAISS's sa_encode (kbs before 0.2.0's grid keep their manifest)
        entry["encoder"] = cb.encoder
    return entry


def read(kb_dir: Path, entry: dict) -> "vq.Codebooks":
    """The codebooks a manifest's `quant.vq` names; one M3Error naming the file if it is missing,
    damaged, or not the one the manifest recorded."""
    path = Path(kb_dir) / entry["path"]
    if not path.is_file():
        raise M3Error(f"{path}: the kb's VQ codebooks file is missing, and its memories cannot be decoded "
                      f"without it; {FIX}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types on a damaged file
        raise M3Error(f"{path}: the kb's VQ codebooks file cannot be read ({e}); {FIX}") from None
    # the bytes must be the ones the manifest recorded before FAISS deserializes any of them (its
    # reader is not made for hostile input), and before the metadata sizes anything
    if vq.digest(tensors, meta) != entry["sha256"]:
        raise M3Error(f"{path}: these codebooks are not the ones the kb's memories were written with "
                      f"(sha256 differs from the manifest's: damaged or replaced); {FIX}")
    try:
        cb = vq.Codebooks.from_tensors(tensors, meta, where=path.name)
    except M3Error as e:  # vq names the tensor; the fix is the kb's
        raise M3Error(f"{str(e).split('; ')[0]}; the kb's VQ codebooks file is damaged: {FIX}") from None
    assert cb.sha256() == entry["sha256"], path  # the same bytes, rebuilt
    return cb
