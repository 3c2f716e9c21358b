"""`m3 verify`: check a knowledge base against its manifest and name every fault.

Every file's size and sha256; every shard's tensors; every reference row against the shard that
holds it (location, ref id, content key); every payload decoded, with the shape the manifest
implies; the counts; the retrieval indexes; and optionally N references re-encoded with the model
and compared within the codec's recorded error. Reads only; a fault is a line of text.
"""

import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from m3compile import references as refs_file
from m3compile.errors import M3Error
from m3compile.manifest import read_manifest
from m3compile.model import sha256_file
from m3compile.pack import decode_payload, payload_nbytes, read_frame, read_shard_header
from m3compile.quantize import get_scheme
from m3compile.store import shard_number


def _check_files(kb: Path, manifest: dict) -> list[str]:
    faults = []
    for name, entry in sorted(manifest["files"].items()):
        p = kb / name
        if not p.is_file():
            faults.append(f"{name}: missing")
        elif p.stat().st_size != entry["bytes"]:
            faults.append(f"{name}: {p.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or changed)")
        elif sha256_file(p) != entry["sha256"]:
            faults.append(f"{name}: sha256 differs from the manifest (the file was changed or damaged)")
    return faults


def _read_shards(kb: Path, manifest: dict, faults: list[str]) -> dict[str, dict]:
    shards = {}
    for name in manifest["state"]["shards"]:
        if not (kb / name).is_file():
            continue  # already reported as missing
        p = f"shard.{shard_number(name):05d}"
        try:
            read_shard_header(kb / name)
            with safe_open(str(kb / name), framework="numpy") as f:
                t = {k: f.get_tensor(f"{p}.{k}") for k in ("kv_offsets", "ref_ids", "ref_keys", "ref_errs")}
                t["kv_len"] = f.get_slice(f"{p}.kv").get_shape()[0]
        except Exception as e:  # any damage is a fault to name, not a crash
            faults.append(f"{name}: unreadable shard ({e})")
            continue
        o, n = t["kv_offsets"], len(t["ref_ids"])
        if len(o) != n + 1 or o[0] != 0 or o[-1] != t["kv_len"] or (np.diff(o) <= 0).any() or (np.diff(t["ref_ids"]) <= 0).any():
            faults.append(f"{name}: offsets or ref ids are inconsistent")
            continue
        shards[name] = t
    return shards


def verify_kb(kb_dir: str | Path, recompute: int = 0, model: str | Path | None = None, seed: int = 0,
              device: str = "cpu") -> list[str]:
    """Every fault found in the kb, one line each; [] when everything holds.

    Args:
        kb_dir: the knowledge base.
        recompute: re-encode this many random references with the model and compare.
        model: the checkpoint (default: the path the manifest records).
    """
    kb = Path(kb_dir)
    try:
        manifest = read_manifest(kb)
    except M3Error as e:
        return [f"manifest.json: {e}"]
    faults = _check_files(kb, manifest)
    shards = _read_shards(kb, manifest, faults)
    try:
        rows = refs_file.read_references(kb / manifest["paths"]["references"]).to_pylist()
    except M3Error as e:
        return faults + [f"{manifest['paths']['references']}: {e}"]
    c, w, m = manifest["counts"], manifest["write"], manifest["model"]
    if len(rows) != c["references"]:
        faults.append(f"references table has {len(rows)} rows, the manifest counts {c['references']}")
    if sum(r["n_tokens"] for r in rows) != c["tokens"]:
        faults.append("token count of the references table differs from the manifest")
    scheme = get_scheme(manifest["quant"]["scheme"])
    L, H, D = len(w["memory_layers"]), m["n_kv_heads"], m["head_dim"]
    cap = payload_nbytes(scheme, L, H, w["top_k"], D)
    kept = 0
    for r in rows:
        where = f"reference {r['ref_id']} ({r['shard']})"
        t = shards.get(r["shard"])
        if t is None:
            if r["shard"] not in manifest["state"]["shards"]:
                faults.append(f"{where}: its shard is not named by the manifest")
            continue
        i = int(np.searchsorted(t["kv_offsets"], r["byte_offset"]))
        if i >= len(t["ref_ids"]) or t["kv_offsets"][i] != r["byte_offset"] \
                or t["kv_offsets"][i + 1] - r["byte_offset"] != r["byte_length"] or t["ref_ids"][i] != r["ref_id"]:
            faults.append(f"{where}: location does not match the shard's offsets and ref ids")
            continue
        if t["ref_keys"][i].tobytes().hex() != r["ref_key"]:
            faults.append(f"{where}: content key differs between the table and the shard")
        try:
            keys, values, pos = decode_payload(read_frame(kb / r["shard"], r["byte_offset"], r["byte_length"]),
                                               scheme, cap, where)
        except M3Error as e:
            faults.append(str(e))
            continue
        K = min(w["top_k"], r["n_tokens"])
        if tuple(keys.shape) != (L, H, K, D) or r["n_kept"] != K:
            faults.append(f"{where}: payload shape {tuple(keys.shape)}, expected {(L, H, K, D)}")
        elif pos.numel() and (int(pos.max()) >= r["n_tokens"] or (pos.diff(dim=-1) <= 0).any()):
            faults.append(f"{where}: kept positions are out of range or not ascending")
        kept += L * H * K
    if kept != c["kept_kv"] and not any("payload" in f for f in faults):
        faults.append(f"kept key-values sum to {kept}, the manifest counts {c['kept_kv']}")
    faults += _check_retrieval(kb, manifest, len(rows))
    if recompute and not faults:
        faults += _recompute(kb, rows, recompute, model, seed, device)
    return faults


def _check_retrieval(kb: Path, manifest: dict, n_rows: int) -> list[str]:
    from m3compile.retrieve import Retriever

    try:
        r = Retriever.open(kb, manifest)
        text = manifest.get("write", {}).get("prefix_text") or "a"
        r.retrieve(text, 1, mode="bm25")
    except Exception as e:  # a damaged index surfaces as any library error
        return [f"retrieval index: cannot be loaded or queried ({e})"]
    return []


def _recompute(kb: Path, rows: list[dict], n: int, model, seed: int, device: str) -> list[str]:
    from m3compile.encode import encode_batch
    from m3compile.kb import load_kb_model, open_kb
    from m3compile.sparsify import select_topk

    base = open_kb(kb)
    ck = load_kb_model(base, model, device=device, dtype=base.manifest["model"]["dtype"])
    w = base.manifest["write"]
    faults = []
    for r in random.Random(seed).sample(rows, min(n, len(rows))):
        mem = select_topk(encode_batch(ck.model, [r["token_ids"]], w["prefix_ids"], w["memory_layers"],
                                       pad_to=w["max_tokens"]), w["top_k"])[0]
        stored = base.memory(r["ref_id"])
        tol = r["quant_max_err"] * (1 + 1e-3) + 1e-5
        if not torch.equal(stored.positions, mem.positions):
            faults.append(f"reference {r['ref_id']}: recomputed kept tokens differ from the stored ones")
        elif max((stored.keys - mem.keys.float()).abs().max(), (stored.values - mem.values.float()).abs().max()) > tol:
            faults.append(f"reference {r['ref_id']}: recomputed key-values differ by more than the codec's "
                          f"recorded error {r['quant_max_err']:.3g}")
    return faults
