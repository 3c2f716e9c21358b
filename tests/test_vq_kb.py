"""Vector-quantized kbs (issue 15): codebooks trained on the kb's own memories, stored as a
content-addressed safetensors artefact named in the manifest and in every content key, frozen by
incremental compiles (with a drift report), deterministic, verified, and refused by name when
damaged."""

import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import memory_errors, model_and_corpus, run_cli, words
from m3compile import codebooks as cbf
from m3compile.config import CompileConfig
from m3compile.errors import M3Error
from m3compile.kb import describe, open_kb
from m3compile.pipeline import compile_kb
from m3compile.verify import verify_kb

pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoints")


@pytest.fixture
def env(tmp_path):
    corpus = model_and_corpus(tmp_path, [60 + 9 * i for i in range(6)])
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=8, quant="vq-pq4",
                        codebook_sample=64)
    return tmp_path, corpus, cfg


def files(kb: Path) -> dict:
    return {p.relative_to(kb).as_posix(): p.read_bytes() for p in kb.rglob("*") if p.is_file() and p.name != "run.json"}


def test_vq_kb_round_trip_is_deterministic_and_verified(env):
    tmp, corpus, cfg = env
    m = compile_kb(cfg, tmp / "a").manifest
    compile_kb(cfg, tmp / "b")
    assert files(tmp / "a") == files(tmp / "b")  # codebooks and every frame, byte for byte
    vq = m.quant["vq"]
    assert m.quant["scheme"] == "vq-pq4" and (tmp / "a" / vq["path"]).is_file() and vq["path"] in m.files
    assert m.identity["codebooks_sha256"] == vq["sha256"]
    # PQ4x4 at head dim 16: 2 bytes of code a vector, 1 bit per element before positions, headers and zstd
    assert vq["code_size"] == 2 and m.quant["bits_per_element_with_codebooks"] > m.quant["bits_per_element_compressed"]
    assert verify_kb(tmp / "a", recompute=3) == []
    kb = open_kb(tmp / "a")
    assert describe(kb)["quant"]["vq"]["factory"] == "PQ4x4"
    mem = kb.memory(0)
    assert mem.keys.shape[-1] == 16 and torch.isfinite(mem.keys).all()
    # each reference's recorded error is what its decoded memory gives against the lossless kb's,
    # keys and values together, computed here (formats/references.md); the manifest's max is theirs
    from dataclasses import replace

    compile_kb(replace(cfg, quant="none"), tmp / "none")
    exact, rows = open_kb(tmp / "none"), kb.references().select(["ref_id", "quant_rel_err"]).to_pylist()
    assert len(rows) == m.counts["references"] > 7
    for row in rows:
        assert row["quant_rel_err"] == pytest.approx(memory_errors(exact, kb, row["ref_id"])[0], rel=1e-3), row
    assert max(r["quant_rel_err"] for r in rows) == m.quant["rel_err_max"] < 1.0


def test_the_default_vq_kb_encodes_through_its_grid_and_grows_with_it(env):
    """`--quant vq` records vq-grid; its codebooks say `grid`, verify re-encodes through the grid,
    and an incremental compile keeps the codebooks and encodes its new references through them."""
    from dataclasses import replace

    tmp, corpus, cfg = env
    cfg = replace(cfg, quant="vq", codebook_sample=256)  # PQ8x8 at head dim 16: 256-entry books
    m = compile_kb(cfg, tmp / "a").manifest
    assert m.quant["scheme"] == "vq-grid" and m.quant["vq"]["encoder"] == "grid"
    cb = open_kb(tmp / "a").spec.codebooks
    assert cb.encoder == "grid" and cb.factory == "PQ8x8"
    assert verify_kb(tmp / "a", recompute=5) == []
    extra = corpus / "zz-new.txt"
    extra.write_text(words(99, 300))
    r = compile_kb(cfg, tmp / "a")
    assert r.summary["references"]["encoded"] > 0 and r.manifest.quant["vq"]["sha256"] == m.quant["vq"]["sha256"]
    # every frame, old and new, is what the kb's own grid gives its reference: recompute checks all
    assert verify_kb(tmp / "a", recompute=10**6) == []


def test_codebooks_are_part_of_every_content_key(env):
    tmp, _, cfg = env
    kb = open_kb(compile_kb(cfg, tmp / "kb") and tmp / "kb")
    spec = kb.spec
    other = spec.with_codebooks(spec.codebooks, "0" * 64)
    assert spec.key_context() != other.key_context()
    # formats/manifest.md, "Content keys": the documented JSON plus "codebooks_sha256"; a spec without
    # codebooks (an int8 or int4 kb) hashes the JSON without the field, the keys such kbs always had
    from dataclasses import replace

    doc = {"model": {"config_sha256": spec.model_config_sha256, "weights_sha256": dict(spec.model_weights_sha256),
                     "tokenizer_sha256": spec.tokenizer_sha256},
           "prefix_ids": list(spec.prefix_ids), "top_k": spec.top_k, "memory_layers": list(spec.memory_layers),
           "quant": spec.quant, "dtype": spec.dtype, "pad_to": spec.width, "payload": "m3-kv/1"}

    def digest(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).digest()

    assert spec.codebooks_sha256 == kb.manifest.quant["vq"]["sha256"]
    assert spec.key_context() == digest({**doc, "codebooks_sha256": spec.codebooks_sha256})
    assert replace(spec, codebooks_sha256=None, codebooks=None).key_context() == digest(doc)


def test_incremental_compiles_keep_frozen_codebooks_and_report_drift(env):
    tmp, corpus, cfg = env
    first = compile_kb(cfg, tmp / "kb").manifest
    (corpus / "doc9.txt").write_text(words(99, 80))
    r = compile_kb(cfg, tmp / "kb")
    assert r.manifest.quant["vq"]["sha256"] == first.quant["vq"]["sha256"]  # frozen
    assert r.summary["references"]["reused"] == first.counts["references"]
    drift = r.summary["codebook_drift"]
    assert drift["references"] == r.summary["references"]["encoded"] > 0 and drift["ratio"] > 0
    # retraining trains on the grown corpus: new codebooks, every memory written again
    r2 = compile_kb(cfg, tmp / "kb", retrain_codebooks=True)
    assert r2.manifest.quant["vq"]["sha256"] != first.quant["vq"]["sha256"]
    assert r2.summary["references"]["encoded"] == r2.manifest.counts["references"]
    assert verify_kb(tmp / "kb") == [] and not (tmp / "kb" / first.quant["vq"]["path"]).exists()
    # other memory settings are refused by name, as for any kb: no silent retraining and rebuild
    with pytest.raises(M3Error, match="different top_k.*--rebuild"):
        compile_kb(CompileConfig(**{**cfg.to_dict(), "top_k": 4}), tmp / "kb")


def test_codebook_settings_given_to_a_kb_that_keeps_its_codebooks_are_not_recorded(env):
    # the kb's codebooks are kept when it grows; --codebook-sample/--codebook-seed given then were
    # recorded in its manifest beside codebooks they never trained (and --check called them changes)
    from dataclasses import replace

    from m3compile.pipeline import check_kb

    tmp, corpus, cfg = env
    first = compile_kb(cfg, tmp / "kb").manifest
    (corpus / "doc9.txt").write_text(words(99, 80))
    other = replace(cfg, codebook_sample=32, codebook_seed=5)
    assert check_kb(other, tmp / "kb") == check_kb(cfg, tmp / "kb") != []  # the new document only
    logged = []
    r = compile_kb(other, tmp / "kb", log=logged.append)
    assert r.manifest.quant["vq"]["sha256"] == first.quant["vq"]["sha256"]
    assert (r.manifest.config["codebook_sample"], r.manifest.config["codebook_seed"]) == (64, 0)
    assert any("codebooks are kept (trained with --codebook-sample 64 --codebook-seed 0)" in l for l in logged), logged
    assert check_kb(other, tmp / "kb") == [] and check_kb(cfg, tmp / "kb") == []
    r = compile_kb(other, tmp / "kb", retrain_codebooks=True)  # where they apply
    assert (r.manifest.config["codebook_sample"], r.manifest.quant["vq"]["seed"]) == (32, 5)
    assert verify_kb(tmp / "kb") == []


def test_a_kb_grows_with_its_codebook_settings_and_the_preset_vq_meant(env, monkeypatch):
    """Grown without --quant or --codebook-*, a vq kb keeps what it was compiled with: its seed (the
    manifest recorded the default's and --check never held), and the preset `vq` resolved to then,
    whatever `vq` means now (it was refused as a "different quant" after a default change)."""
    from dataclasses import replace

    from m3compile import vq
    from m3compile.pipeline import check_kb

    tmp, corpus, cfg = env
    monkeypatch.setitem(vq.PRESETS, "vq", vq.PRESETS["vq-pq4"])  # `vq` as an earlier default meant it
    first = compile_kb(replace(cfg, quant="vq", codebook_seed=7, codebook_sample=32), tmp / "kb").manifest
    assert first.quant["scheme"] == "vq-pq4" and first.quant["vq"]["seed"] == 7
    monkeypatch.undo()
    assert cbf.resolve_quant("vq", 16) != "vq-pq4"
    (corpus / "doc9.txt").write_text(words(99, 80))
    bare = CompileConfig(corpus=str(corpus), max_tokens=16, top_k=8)
    logged = []
    r = compile_kb(bare, tmp / "kb", log=logged.append)
    assert r.manifest.quant["vq"]["sha256"] == first.quant["vq"]["sha256"]  # frozen, not refused
    assert r.summary["references"]["reused"] == first.counts["references"]
    assert r.manifest.config["codebook_seed"] == 7 and r.manifest.config["codebook_sample"] == 32
    assert any("using the kb's, vq-pq4" in line for line in logged), logged
    assert check_kb(bare, tmp / "kb") == []
    # while `vq` still names a kb's preset, its record stays `vq`: up to date with --quant vq or without
    # (a record replaced by the preset flipped --check between the two spellings)
    fresh = compile_kb(replace(cfg, quant="vq"), tmp / "kb2").manifest
    assert fresh.config["quant"] == "vq" and fresh.quant["scheme"] == "vq-grid"
    assert check_kb(replace(bare, quant="vq"), tmp / "kb2") == [] and check_kb(bare, tmp / "kb2") == []
    assert compile_kb(bare, tmp / "kb2").manifest.config["quant"] == "vq"


@pytest.mark.slow
def test_a_new_kb_killed_after_training_its_codebooks_does_not_train_them_again(env):
    """Killed between training and its commit, a new vq kb resumes with the codebooks it trained
    (noted in .spill/ with what they were trained from) and gives the bytes of an uninterrupted
    compile; a note that does not hold, or a seed changed, trains them again."""
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "ref")
    args = ["compile", corpus, "-o", tmp / "kb", "--model", tmp / "model", "--max-tokens", 16, "--top-k", 8,
            "--quant", "vq-pq4", "--codebook-sample", 64]
    killed = run_cli(args, {"M3_CRASH_AT": "codebooks"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    note = tmp / "kb" / ".spill" / "codebooks-trained.json"
    assert note.is_file() and not (tmp / "kb" / "manifest.json").exists()
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "not trained again" in resumed.stderr and "trained vq-pq4 codebooks" not in resumed.stderr
    assert files(tmp / "kb") == files(tmp / "ref") and not note.exists()  # the commit drops .spill/
    # a damaged note, or other inputs (the seed), are trained anew: never codebooks of another sample
    for kb, killed_with, damage in (("kb2", [], "{"), ("kb3", ["--codebook-seed", 1], None)):
        args[3] = tmp / kb
        killed = run_cli(args + killed_with, {"M3_CRASH_AT": "codebooks"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if damage is not None:
            (tmp / kb / ".spill" / "codebooks-trained.json").write_text(damage)
        resumed = run_cli(args)  # the default seed
        assert resumed.returncode == 0 and "trained vq-pq4 codebooks" in resumed.stderr, resumed.stderr
        assert files(tmp / kb) == files(tmp / "ref")


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_damaged_codebooks_file_is_named(env, damage):
    tmp, _, cfg = env
    m = compile_kb(cfg, tmp / "kb").manifest
    path = tmp / "kb" / m.quant["vq"]["path"]
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(M3Error, match=path.name):
        open_kb(tmp / "kb")
    faults = verify_kb(tmp / "kb")
    assert sum(path.name in f for f in faults) == 1 and "--retrain-codebooks" in faults[-1], faults  # named once
    with pytest.raises(M3Error, match=f"{path.name}.*--retrain-codebooks"):
        compile_kb(cfg, tmp / "kb")
    compile_kb(cfg, tmp / "kb", rebuild=True, retrain_codebooks=True)
    assert verify_kb(tmp / "kb") == []


def test_a_manifest_whose_codebooks_entry_is_damaged_is_one_error(env):
    # a KeyError traceback from open_kb, verify and inspect (and at the end of a growing compile)
    tmp, _, cfg = env
    compile_kb(cfg, tmp / "kb")
    doc = json.loads((tmp / "kb" / "manifest.json").read_text())
    for key, value in (("sha256", None), ("train_rel_err_mean", "0.1"), ("code_size", True)):
        damaged = {**doc, "quant": {**doc["quant"], "vq": {**doc["quant"]["vq"], key: value}}}
        if value is None:
            del damaged["quant"]["vq"][key]
        (tmp / "kb" / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(M3Error, match=f"quant.vq.{key}.*the manifest is damaged"):
            open_kb(tmp / "kb")
        faults = verify_kb(tmp / "kb")
        assert len(faults) == 1 and f"quant.vq.{key}" in faults[0], faults
        with pytest.raises(M3Error, match=f"quant.vq.{key}"):
            compile_kb(cfg, tmp / "kb")


def test_codebooks_the_manifest_does_not_vouch_for_never_reach_faiss(env, monkeypatch):
    # a codebooks file rewritten whole, its own per-tensor digests made to match, passed the file's
    # self-check and went to faiss.deserialize_index (not made for hostile bytes) before the
    # manifest's sha256 was compared; now nothing is deserialized unless the manifest vouches for it
    import faiss
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from m3compile import vq

    tmp, _, cfg = env
    m = compile_kb(cfg, tmp / "kb").manifest
    path = tmp / "kb" / m.quant["vq"]["path"]
    with safe_open(str(path), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = np.concatenate([tensors[name], np.zeros(8, np.uint8)])  # other bytes for faiss
    digests = json.loads(meta["sha256"])
    digests[name] = hashlib.sha256(tensors[name].tobytes()).hexdigest()
    meta["sha256"] = json.dumps(digests, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    assert vq.digest(tensors, meta) != m.quant["vq"]["sha256"]
    monkeypatch.setattr(faiss, "deserialize_index", lambda t: pytest.fail("deserialized unvouched bytes"))
    with pytest.raises(M3Error, match=f"{path.name}: these codebooks are not the ones"):
        open_kb(tmp / "kb")
    assert any(path.name in f for f in verify_kb(tmp / "kb"))


def test_vq_is_recorded_as_the_preset_it_resolves_to(env):
    # `vq` is whichever preset is the default now; a kb records the preset, so a later default
    # change does not change what its memories mean
    from dataclasses import replace

    assert cbf.resolve_quant("vq", 32) == "vq-grid" and cbf.resolve_quant("vq:PQ8x4", 32) == "vq:PQ8x4"
    tmp, _, cfg = env
    m = compile_kb(replace(cfg, quant="vq", codebook_sample=256), tmp / "kb").manifest
    assert m.quant["scheme"] == "vq-grid" and open_kb(tmp / "kb").spec.quant == "vq-grid"


def test_unknown_vq_names_are_one_clear_error(env):
    tmp, _, cfg = env
    for quant, fragment in (("vq-nope", "unknown vector quantizer"), ("vq:PQ5x4", "FAISS cannot build"),
                            # search indexes that FAISS builds but cannot code with: a RuntimeError
                            # traceback after the sample was memorized
                            ("vq:HNSW32", "not a vector codec"), ("vq:IDMap,Flat", "not a vector codec")):
        with pytest.raises(M3Error, match=fragment):
            compile_kb(CompileConfig(**{**cfg.to_dict(), "quant": quant}), tmp / "kb")
    # FAISS takes 32-bit seeds: an OverflowError traceback after the sample was memorized
    with pytest.raises(M3Error, match="--codebook-seed 3000000000 must be 0 or more and below 2"):
        CompileConfig(**{**cfg.to_dict(), "codebook_seed": 3_000_000_000})
    # a seed of the old range near its top (e.g. `date +%s`) still trains: codec seeds wrap below 2^31
    top = compile_kb(CompileConfig(**{**cfg.to_dict(), "codebook_seed": 2**31 - 1}), tmp / "kb-top-seed").manifest
    assert top.quant["vq"]["seed"] == 2**31 - 1 and verify_kb(tmp / "kb-top-seed") == []
    assert not (tmp / "kb" / "manifest.json").exists()  # the refused compiles wrote no kb
