"""`m3 verify`: check a knowledge base against its manifest and name every fault.

Every file's size and sha256; every shard's tensors; every reference row against the shard that
holds it (location, ref id, content key); every payload decompressed and split, with the shape the manifest
implies; the counts; the retrieval indexes; and optionally N references re-encoded with the model
and compared within the codec's recorded error. Reads only; a fault is a line of text.
`m3 verify --repair` then runs pipeline.repair_kb, which rebuilds what is faulted.
"""

import numbers
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
from safetensors import safe_open

from m3compile import references as refs_file
from m3compile.config import default_refs_per_batch
from m3compile.errors import M3Error
from m3compile.manifest import Manifest, read_manifest
from m3compile.pack import ShardReaders, ascending_below, open_frame, read_shard_header
from m3compile.store import damaged_files, shard_number

Progress = Callable[[int, int], None]  # (done, total) of the references re-encoded


def _read_shards(kb: Path, manifest: Manifest, faults: list[str]) -> dict[str, dict]:
    shards = {}
    for name in manifest.shards:
        if not (kb / name).is_file():
            continue  # already reported as missing
        p = f"shard.{shard_number(name):05d}"
        try:
            quant = read_shard_header(kb / name)["__metadata__"].get("quant")
            if quant != manifest.spec.quant:
                # readers decode with the manifest's scheme: a shard written with another (two
                # schemes of equal size, none-float16 and none-bfloat16) would decode to other numbers
                faults.append(f"{name}: its quant {quant!r} is not the kb's {manifest.spec.quant!r}")
                continue
            with safe_open(str(kb / name), framework="numpy") as f:
                t = {k: f.get_tensor(f"{p}.{k}") for k in ("kv_offsets", "ref_ids", "ref_keys", "ref_errs")}
                t["kv_len"] = f.get_slice(f"{p}.kv").get_shape()[0]
            t["path"] = kb / name
        except Exception as e:  # any damage is a fault to name, not a crash
            faults.append(f"{name}: unreadable shard ({e})")
            continue
        o, n = t["kv_offsets"], len(t["ref_ids"])
        if len(o) != n + 1 or o[0] != 0 or o[-1] != t["kv_len"] or (np.diff(o) <= 0).any() or (np.diff(t["ref_ids"]) <= 0).any() \
                or t["ref_keys"].shape != (n, 32) or t["ref_errs"].shape != (n, 2):
            faults.append(f"{name}: offsets or ref ids are inconsistent")
            continue
        shards[name] = t
    return shards


def verify_kb(kb_dir: str | Path, recompute: int = 0, model: str | Path | None = None, seed: int = 0,
              device: str = "cpu", progress: Progress | None = None) -> list[str]:
    """Every fault found in the kb, one line each; [] when everything holds.

    Args:
        kb_dir: the knowledge base.
        recompute: re-encode this many random references with the model and compare (0: none;
            more than the kb holds: all of them).
        model: the checkpoint (default: the path the manifest records).
        seed: which references `recompute` samples.
        device: torch device of the re-encoding.
        progress: called with (done, total) as references are re-encoded.
    Example:
        >>> verify_kb("kb/", recompute=20)
        []
    """
    if not isinstance(recompute, numbers.Integral) or isinstance(recompute, (bool, np.bool_)) or recompute < 0:
        # "20" was a TypeError traceback
        raise M3Error(f"--recompute {recompute!r} must be a whole number, 0 or more (references to re-encode)")
    recompute = int(recompute)
    if not isinstance(kb_dir, (str, os.PathLike)):
        raise M3Error(f"kb_dir={kb_dir!r} ({type(kb_dir).__name__}) must be a path (str or os.PathLike)")
    kb = Path(kb_dir)
    try:
        manifest = read_manifest(kb)
    except M3Error as e:
        if not kb.is_dir():
            raise
        return [f"manifest.json: {e}"]
    damaged = damaged_files(kb, manifest.files)
    faults = [f"{name}: {why}" for name, why in damaged.items()]
    shards = _read_shards(kb, manifest, faults)
    refs_path = kb / manifest.paths["references"]
    try:  # the columns the checks read (token ids and texts only where --recompute asks); a
        # damaged table whole, so that damage in any column is named as its reader meets it
        table = refs_file.read_references(refs_path, None if manifest.paths["references"] in damaged
                                          else list(_CHECKED))
    except M3Error as e:
        return faults + [f"{manifest.paths['references']}: {e}"]
    from m3compile.kb import load_spec

    c = manifest.counts
    try:
        spec = load_spec(kb, manifest)
    except M3Error as e:
        # the file is named once: this message (which says what to do) replaces the checksum fault
        return [f for f in faults if f.split(":")[0] not in str(e)] + [str(e)]
    n_rows = table.num_rows
    if n_rows != c["references"]:
        faults.append(f"references table has {n_rows} rows, the manifest counts {c['references']}")
    if (pc.sum(table.column("n_tokens")).as_py() or 0) != c["tokens"]:
        faults.append("token count of the references table differs from the manifest")
    L, H, D = len(spec.memory_layers), spec.n_kv_heads, spec.head_dim
    kept, mx = 0, spec.max_payload()
    with ShardReaders(ahead=VERIFY_READ_AHEAD) as frames:  # each shard's header read once, not once a frame
        for lo in range(0, n_rows, refs_file.COLUMN_BLOCK):
            # a block of rows as columns (not a dict a row: SciFact's 150k took a sixth of the time),
            # its frames read shard by shard in offset order through a 16 MB read-ahead (a read a
            # frame was a quarter of it; a kb's shards hold ref id ranges, so a block's frames lie
            # together), its faults reported in the table's row order
            col = {n: table.column(n).slice(lo, refs_file.COLUMN_BLOCK).to_pylist() for n in _CHECKED}
            order = sorted(range(len(col["ref_id"])), key=lambda j: (col["shard"][j], col["byte_offset"][j]))
            found: list[tuple[int, str]] = []
            for j in order:
                ref_id, shard, offset, length = col["ref_id"][j], col["shard"][j], col["byte_offset"][j], col["byte_length"][j]
                where = f"{shard} reference {ref_id}"
                t = shards.get(shard)
                if t is None:
                    if shard not in manifest.shards:
                        found.append((j, f"{where}: its shard is not named by the manifest"))
                    continue
                i = int(np.searchsorted(t["kv_offsets"], offset))
                if i >= len(t["ref_ids"]) or t["kv_offsets"][i] != offset \
                        or t["kv_offsets"][i + 1] - offset != length or t["ref_ids"][i] != ref_id:
                    found.append((j, f"{where}: location does not match the shard's offsets and ref ids"))
                    continue
                if t["ref_keys"][i].tobytes().hex() != col["ref_key"][j]:
                    found.append((j, f"{where}: content key differs between the table and the shard"))
                try:
                    # decompressed whole (zstd's checksum) and split by the scheme; not dequantized:
                    # that is arithmetic on parts of the checked sizes, which any bytes pass
                    keys, _, pos = open_frame(frames.read(t["path"], offset, length, ref_id), spec.scheme, mx, where,
                                              copy=False)
                except M3Error as e:
                    found.append((j, str(e)))
                    continue
                n_tokens = col["n_tokens"][j]
                K = min(spec.top_k, n_tokens)
                if keys.shape != (L, H, K, D) or col["n_kept"][j] != K:
                    found.append((j, f"{where}: payload shape {keys.shape}, expected {(L, H, K, D)}"))
                elif pos.size and not ascending_below(pos, n_tokens):
                    found.append((j, f"{where}: kept positions are out of range or not ascending"))
                kept += L * H * K
            found.sort(key=lambda f: f[0])  # stable: a row's own faults keep their order
            faults += [f for _, f in found]
    if kept != c["kept_kv"] and not any("payload" in f for f in faults):
        faults.append(f"kept key-values sum to {kept}, the manifest counts {c['kept_kv']}")
    faults += _check_retrieval(kb, manifest, n_rows)
    if recompute and not faults:
        faults += _recompute(kb, refs_file.read_references(refs_path), recompute, model, seed, device,
                             progress or (lambda done, total: None))
    return faults


VERIFY_READ_AHEAD = 1 << 24  # bytes of a shard read at once by verify_kb
_CHECKED = ("ref_id", "shard", "byte_offset", "byte_length", "ref_key", "n_tokens", "n_kept")  # columns verify_kb reads


def _check_retrieval(kb: Path, manifest: Manifest, n_rows: int) -> list[str]:
    from m3compile.retrieve import Retriever

    try:
        r = Retriever.open(kb, manifest.to_dict())
        r.retrieve(manifest.spec.prefix or "a", 1, mode="bm25")
    except Exception as e:  # a damaged index surfaces as any library error
        return [f"retrieval index: cannot be loaded or queried ({e})"]
    return []


def _recompute(kb: Path, table, n: int, model, seed: int, device: str, progress: Progress) -> list[str]:
    import torch

    from m3compile.kb import load_kb_model, open_kb
    from m3compile.spec import memorize

    base = open_kb(kb)
    ck = load_kb_model(base, model, device=device, dtype=base.spec.dtype)
    faults = []
    # the rows random.sample(rows, n) picks: it draws positions from the count alone
    at = random.Random(seed).sample(range(table.num_rows), min(n, table.num_rows))
    sample = table.take(at).to_pylist()
    # a batch's worth at a time: a forward costs a whole row block however few references it holds
    # (model.PackedRows), and a memory is the same bits in any batch
    size = default_refs_per_batch(base.spec.width)
    mems = (m for lo in range(0, len(sample), size)
            for m in memorize(ck.model, [r["token_ids"] for r in sample[lo:lo + size]], base.spec))
    for done, (r, mem) in enumerate(zip(sample, mems), 1):
        stored = base.memory(r["ref_id"])
        tol = r["quant_max_err"] * (1 + 1e-3) + 1e-5
        if not torch.equal(stored.positions, mem.positions):
            faults.append(f"{r['shard']} reference {r['ref_id']}: recomputed kept tokens differ from the stored ones")
        elif max((stored.keys - mem.keys.float()).abs().max(), (stored.values - mem.values.float()).abs().max()) > tol:
            faults.append(f"{r['shard']} reference {r['ref_id']}: recomputed key-values differ by more than the "
                          f"codec's recorded error {r['quant_max_err']:.3g}")
        progress(done, len(sample))
    return faults


def recompute_count(kb_dir: str | Path, n: int) -> int:
    """How many references `verify_kb(recompute=n)` re-encodes: n, at most the kb's references."""
    return min(n, read_manifest(Path(kb_dir)).counts["references"])
