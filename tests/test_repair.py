"""The fault table of issue 14: every kind of damage and every bad input gives one `error:` line,
loses nothing committed, and `m3 verify --repair` (or the next compile) restores a kb that equals a
fresh compile byte for byte, without touching its healthy shards."""

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from conftest import model_and_corpus, words
from m3compile import references as refs_file
from m3compile.cli import app
from m3compile.config import CompileConfig
from m3compile.errors import M3Error
from m3compile.kb import open_kb
from m3compile.pack import ShardWriter, read_shard_header
from m3compile.pipeline import compile_kb
from m3compile.store import shard_frames
from m3compile.verify import verify_kb

pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoints")
runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A kb of several shards and a fresh copy to compare against, compiled once for the module."""
    root = tmp_path_factory.mktemp("repair")
    corpus = model_and_corpus(root, [30 + 7 * i for i in range(4)])
    cfg = CompileConfig(corpus=str(corpus), model=str(root / "model"), max_tokens=16, top_k=4,
                        max_shard_bytes=1500, batch_size=3)
    compile_kb(cfg, root / "pristine")
    return root, cfg


@pytest.fixture
def kb(built, tmp_path):
    """A copy of the pristine kb beside the corpus and model (paths in the manifest are relative)."""
    root, cfg = built
    for name in ("model", "corpus"):
        (tmp_path / name).symlink_to(root / name)
    shutil.copytree(root / "pristine", tmp_path / "kb")
    return tmp_path / "kb", CompileConfig(**{**cfg.to_dict(), "corpus": str(tmp_path / "corpus"),
                                             "model": str(tmp_path / "model")})


def files(kb: Path) -> dict:
    return {p.relative_to(kb).as_posix(): p.read_bytes() for p in kb.rglob("*")
            if p.is_file() and p.name not in ("run.json", ".m3.lock")}


def mtimes(kb: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in kb.glob("memory-*.safetensors")}


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def bomb(kb: Path, shard: str) -> None:
    """Replace the shard's first frame by a small zstd frame that inflates to 64 MiB."""
    big = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"\0" * (64 << 20))
    frames = shard_frames(kb / shard)
    meta = dict(read_shard_header(kb / shard)["__metadata__"])
    raw = (kb / shard).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    kv_start = 8 + header_len + read_shard_header(kb / shard)[f"shard.{int(shard[7:12]):05d}.kv"]["data_offsets"][0]
    tmp = kb / "bomb"
    tmp.mkdir()
    with ShardWriter(tmp, meta, 1 << 40, first_index=int(shard[7:12])) as w:
        for i, (ref_id, key, f) in enumerate(frames):
            data = big if i == 0 else raw[kv_start + f.offset:kv_start + f.offset + f.length]
            w.add(ref_id, data, key, (f.rel_err, f.max_err))
    os.replace(tmp / shard, kb / shard)
    tmp.rmdir()


def damage_first_shard(kind: str):
    def apply(kb: Path) -> str:
        shard = sorted(json.loads((kb / "manifest.json").read_text())["state"]["shards"])[0]
        p = kb / shard
        if kind == "flipped byte":
            flip(p, p.stat().st_size - 20)  # inside the last frame
        elif kind == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif kind == "deleted":
            p.unlink()
        elif kind == "header length 2^40":
            p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:])
        elif kind == "zstd bomb":
            bomb(kb, shard)
        return shard
    return apply


def damage_references(kb: Path) -> str:
    gen = json.loads((kb / "manifest.json").read_text())["generation"]
    flip(kb / gen / refs_file.FILE_NAME)
    return f"{gen}/{refs_file.FILE_NAME}"


def damage_bm25(kb: Path) -> str:
    m = json.loads((kb / "manifest.json").read_text())
    name = next(n for n in m["files"] if "/bm25/" in n)
    flip(kb / name)
    return name


DAMAGE = {"flipped byte": damage_first_shard("flipped byte"), "truncated": damage_first_shard("truncated"),
          "deleted": damage_first_shard("deleted"), "header length 2^40": damage_first_shard("header length 2^40"),
          "zstd bomb": damage_first_shard("zstd bomb"), "corrupt parquet": damage_references,
          "corrupt bm25 index": damage_bm25}


@pytest.mark.parametrize("how", ["compile", "verify --repair"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_then_repaired_to_the_fresh_bytes(built, kb, kind, how):
    root, _ = built
    kb_dir, cfg = kb
    fresh = files(root / "pristine")
    before = mtimes(kb_dir)
    name = DAMAGE[kind](kb_dir)
    faults = verify_kb(kb_dir)
    assert any(f.startswith(name) for f in faults), faults
    if how == "compile":
        r = compile_kb(cfg, kb_dir)
    else:
        r = runner.invoke(app, ["verify", str(kb_dir), "--repair"])
        assert r.exit_code == 0, r.output
        assert "every check holds" in r.stdout
        # a lost table is cut again from the same corpus: said so, not as a corpus that changed
        assert "the corpus changed" not in r.output
        assert ("the references table was rebuilt from the corpus" in r.output) == (kind == "corrupt parquet"), r.output
    assert verify_kb(kb_dir, recompute=3) == []
    assert files(kb_dir) == fresh
    # healthy shards are not touched
    healthy = {s: t for s, t in before.items() if s != name}
    assert {s: t for s, t in mtimes(kb_dir).items() if s in healthy} == healthy
    if how == "compile":
        assert r.summary["repaired"] == ([name] if name.startswith("memory-") else [])


def test_a_repair_without_the_corpus_keeps_the_recorded_paths(built, kb):
    # a repair that needs no corpus (the table holds the token ids) runs where the corpus is gone;
    # the manifest it commits records the corpus as before ("../corpus"), not a path made from the
    # kb directory that exists nowhere
    kb_dir, cfg = kb
    recorded = json.loads((kb_dir / "manifest.json").read_text())["config"]
    (kb_dir.parent / "corpus").unlink()
    name = DAMAGE["flipped byte"](kb_dir)
    r = runner.invoke(app, ["verify", str(kb_dir), "--repair"])
    assert r.exit_code == 0 and "every check holds" in r.stdout, r.output
    assert json.loads((kb_dir / "manifest.json").read_text())["config"] == recorded
    assert verify_kb(kb_dir) == [] and name.startswith("memory-")


def test_a_repair_that_cuts_nothing_keeps_what_the_corpus_said(tmp_path):
    # a repair from the kb's own rows reads no corpus: it recorded `counts.skipped` as {} (a fresh
    # compile of the same corpus says otherwise) and stamped run.json with the running tokenizers
    # library, vouching for rows another library cut (the next compile would give them back uncut)
    corpus = model_and_corpus(tmp_path, [30, 37])
    (corpus / "empty.txt").write_text("")
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4)
    kb = tmp_path / "kb"
    compile_kb(cfg, kb)
    skipped = json.loads((kb / "manifest.json").read_text())["counts"]["skipped"]
    assert skipped == {"empty": 1}
    run = json.loads((kb / "run.json").read_text())
    (kb / "run.json").write_text(json.dumps({**run, "tokenizers": "0.0.1"}))
    damage_bm25(kb)
    r = runner.invoke(app, ["verify", str(kb), "--repair"])
    assert r.exit_code == 0 and "every check holds" in r.stdout, r.output
    assert json.loads((kb / "manifest.json").read_text())["counts"]["skipped"] == skipped
    assert json.loads((kb / "run.json").read_text())["tokenizers"] == "0.0.1"


def test_a_truncated_shard_gives_up_the_frames_before_its_cut(built, kb):
    """The frames lie before the shard's key table (formats/kv-shard.md): a cut tail loses only
    those past it, and a repair copies the rest (each checked whole) instead of encoding all again."""
    root, _ = built
    kb_dir, cfg = kb
    shard = kb_dir / sorted(json.loads((kb_dir / "manifest.json").read_text())["state"]["shards"])[0]
    n = len(shard_frames(shard))
    shard.write_bytes(shard.read_bytes()[:-40])  # inside the ref_keys table: every frame is whole
    logs = []
    compile_kb(cfg, kb_dir, log=logs.append)
    assert f"repaired {shard.name}: {n} frames copied, 0 encoded again" in logs, logs
    assert files(kb_dir) == files(root / "pristine")


@pytest.mark.parametrize("ahead", [1, 100, 1 << 24])
def test_verify_names_each_damaged_frame_and_no_other(kb, monkeypatch, ahead):
    """verify_kb reads a shard's frames through a read-ahead buffer (verify.VERIFY_READ_AHEAD): a
    byte flipped inside one frame of the middle of a shard faults that reference alone, whether
    the frame lies inside one buffer or across two; two damaged frames come in the table's order."""
    from m3compile import verify

    monkeypatch.setattr(verify, "VERIFY_READ_AHEAD", ahead)
    kb_dir, _ = kb
    state = json.loads((kb_dir / "manifest.json").read_text())["state"]["shards"]
    shard = max(state, key=lambda s: state[s]["refs"])
    frames = shard_frames(kb_dir / shard)  # (ref_id, key, Frame) in offset order
    assert len(frames) >= 3
    header = read_shard_header(kb_dir / shard)
    kv_start = 8 + struct.unpack("<Q", (kb_dir / shard).read_bytes()[:8])[0] + \
        header[f"shard.{int(shard[7:12]):05d}.kv"]["data_offsets"][0]
    hit = [frames[len(frames) // 2], frames[-1]]
    for _, _, f in hit:
        flip(kb_dir / shard, kv_start + f.offset + f.length // 2)
    faults = verify_kb(kb_dir)
    per_frame = [f for f in faults if " reference " in f]
    assert [f.split(":")[0] for f in per_frame] == [f"{shard} reference {ref_id}" for ref_id, _, _ in hit], faults
    assert all("zstd" in f or "checksum" in f or "decompress" in f for f in per_frame), per_frame


def test_the_kept_positions_check_is_the_array_rule():
    """verify's check of a frame's kept positions (.., K): strictly ascending per (layer, head),
    all below the reference's token count; a plain loop for small frames, numpy for big ones."""
    import random

    import numpy as np

    from m3compile.pack import ascending_below as _ascending_below
    rng = random.Random(0)
    for _ in range(3000):
        shape = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 40))
        n = rng.randint(1, 60)
        pos = np.sort(np.array([rng.sample(range(64), shape[2]) for _ in range(shape[0] * shape[1])]), -1)
        pos = pos.reshape(shape).astype(np.uint16)
        if rng.random() < 0.3:  # a repeat or a swap somewhere
            i = tuple(rng.randrange(d) for d in shape[:2])
            j = rng.randrange(shape[2])
            pos[i][j] = pos[i][max(0, j - 1)]
        want = not (int(pos.max()) >= n or (np.diff(pos.astype(np.int64), axis=-1) <= 0).any())
        assert _ascending_below(pos, n) is want, (pos, n)


def test_read_errors_name_the_shard_and_the_reference(kb):
    kb_dir, _ = kb
    shard = damage_first_shard("zstd bomb")(kb_dir)
    base = open_kb(kb_dir)
    first = min(r["ref_id"] for r in base.references().to_pylist() if r["shard"] == shard)
    with pytest.raises(M3Error, match=rf"{shard} reference {first}: .*m3 verify --repair"):
        base.memory(first)


def _rewrite_first_frame(kb: Path, shard: str, edit) -> int:
    """Replace the shard's first frame by edit(its decompressed payload), recompressed whole (a
    frame that passes zstd's checksum and the size checks: crafted, not flipped). Returns its ref id."""
    frames = shard_frames(kb / shard)
    meta = dict(read_shard_header(kb / shard)["__metadata__"])
    raw = (kb / shard).read_bytes()
    kv_start = 8 + struct.unpack("<Q", raw[:8])[0] + \
        read_shard_header(kb / shard)[f"shard.{int(shard[7:12]):05d}.kv"]["data_offsets"][0]
    tmp = kb / "crafted"
    tmp.mkdir()
    with ShardWriter(tmp, meta, 1 << 40, first_index=int(shard[7:12])) as w:
        for i, (ref_id, key, f) in enumerate(frames):
            data = raw[kv_start + f.offset:kv_start + f.offset + f.length]
            if i == 0:
                payload = bytearray(zstandard.ZstdDecompressor().decompress(data))
                edit(payload)
                data = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True).compress(bytes(payload))
            w.add(ref_id, data, key, (f.rel_err, f.max_err))
    os.replace(tmp / shard, kb / shard)
    tmp.rmdir()
    return frames[0][0]


def test_a_frame_that_checks_but_does_not_fit_the_kb_is_refused_by_name(kb):
    # a frame whose zstd checksum holds but whose kept positions leave the reference, or whose
    # header names another shape of the same size, decoded as a good one: only `m3 verify` looked.
    # Reading it is one error naming it now
    kb_dir, _ = kb
    shard = sorted(json.loads((kb_dir / "manifest.json").read_text())["state"]["shards"])[0]

    def far_position(payload):
        struct.pack_into("<H", payload, 14, 60000)  # the first kept position (after the 14-byte header)

    ref = _rewrite_first_frame(kb_dir, shard, far_position)
    with pytest.raises(M3Error, match=rf"{shard} reference {ref}: payload of shape .* do not fit this kb"):
        open_kb(kb_dir).memory(ref)
    with pytest.raises(M3Error, match="do not fit this kb"):
        open_kb(kb_dir).kept_positions(ref)
    assert any(f.startswith(f"{shard} reference {ref}") for f in verify_kb(kb_dir))
    L, H = open_kb(kb_dir).memory(ref + 1).keys.shape[:2]
    if L != H:  # the same bytes read as (H, L, K, D)
        def swapped(payload):
            magic, version, l, h, k, d = struct.unpack_from("<4sHHHHH", payload)
            struct.pack_into("<4sHHHHH", payload, 0, magic, version, h, l, k, d)

        _rewrite_first_frame(kb_dir, shard, swapped)
        with pytest.raises(M3Error, match="do not fit this kb"):
            open_kb(kb_dir).memory(ref)


def test_damaged_headers_tables_and_manifests_are_one_error(kb):
    # each of these raised OverflowError, RecursionError, read garbage offsets or sized frames by a
    # damaged number; each is one M3Error naming the file now
    from m3compile.manifest import read_manifest

    kb_dir, _ = kb
    shard = sorted(json.loads((kb_dir / "manifest.json").read_text())["state"]["shards"])[0]
    good = (kb_dir / shard).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8:8 + n].decode()
    import re

    for bad in (re.sub(r'("data_offsets":\s*\[\s*\d+\s*,\s*)\d+', r"\g<1>1e999", header, count=1), "[" * 100_000):
        assert bad != header
        (kb_dir / shard).write_bytes(struct.pack("<Q", len(bad)) + bad.encode() + good[8 + n:])
        with pytest.raises(M3Error, match=shard):
            read_shard_header(kb_dir / shard)
    (kb_dir / shard).write_bytes(good)
    gen = json.loads((kb_dir / "manifest.json").read_text())["generation"]
    table = kb_dir / gen / refs_file.FILE_NAME
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(table)
    meta = t.schema.metadata
    offsets = pa.array([None] + t.column("byte_offset").to_pylist()[1:], t.schema.field("byte_offset").type)
    pq.write_table(t.set_column(t.schema.get_field_index("byte_offset"), t.schema.field("byte_offset").with_nullable(True),
                                offsets)
                   .replace_schema_metadata(meta), table)
    with pytest.raises(M3Error, match="byte_offset holds nulls"):
        refs_file.read_references(table)
    manifest = kb_dir / "manifest.json"
    doc = json.loads(manifest.read_text())
    for section, key, value in (("write", "top_k", 10**12), ("write", "top_k", "8"), ("model", "head_dim", -16),
                                ("paths", "references", "/etc/passwd"), ("paths", "references", "../x.parquet")):
        manifest.write_text(json.dumps({**doc, section: {**doc[section], key: value}}))
        with pytest.raises(M3Error, match="manifest is damaged"):
            read_manifest(kb_dir)


def test_rebuild_works_over_any_damage(built, kb):
    root, _ = built
    kb_dir, cfg = kb
    for kind in ("zstd bomb", "flipped byte"):
        DAMAGE[kind](kb_dir)
    damage_references(kb_dir)
    compile_kb(cfg, kb_dir, rebuild=True)
    assert verify_kb(kb_dir, recompute=2) == []
    (kb_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(M3Error, match="--rebuild"):
        compile_kb(cfg, kb_dir)
    compile_kb(cfg, kb_dir, rebuild=True)
    # with no manifest to keep readable, a rebuild numbers shards from 1: the fresh compile's bytes
    assert verify_kb(kb_dir) == [] and files(kb_dir) == files(root / "pristine")


def test_disk_full_leaves_the_committed_kb_intact(kb, monkeypatch):
    kb_dir, cfg = kb
    before = files(kb_dir)
    (Path(cfg.corpus).resolve().parent / "more").mkdir()
    corpus2 = Path(cfg.corpus).resolve().parent / "more"
    (corpus2 / "doc9.txt").write_text(words(9, 40))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "gen")
    monkeypatch.setattr(refs_file, "write_references", full)
    r = runner.invoke(app, ["compile", str(corpus2), "-o", str(kb_dir), "--model", cfg.model, "--max-tokens", "16",
                            "--top-k", "4", "--keep-missing"])
    assert_one_line_error(r, "No space left on device", "intact")
    monkeypatch.undo()
    assert verify_kb(kb_dir) == []
    assert {k: v for k, v in files(kb_dir).items() if not k.startswith("memory-")} == \
        {k: v for k, v in before.items() if not k.startswith("memory-")}


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip() and not l.startswith("using the memory")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def _manifest_with(kb_dir: Path, **changes) -> None:
    m = json.loads((kb_dir / "manifest.json").read_text())
    m.update(changes)
    (kb_dir / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("version, fragment", [(0, "format_version 0"), (99, "upgrade m3compile"),
                                               ("1", "format_version '1'"), (None, "format_version None")])
def test_bad_manifest_versions(kb, version, fragment):
    kb_dir, _ = kb
    _manifest_with(kb_dir, format_version=version)
    assert_one_line_error(runner.invoke(app, ["inspect", str(kb_dir)]), fragment)
    assert verify_kb(kb_dir)[0].startswith("manifest.json:")


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.update(state={}), "'shards'"),
    (lambda m: m["paths"].pop("tokenizer"), "'tokenizer'"),
    (lambda m: m.update(counts=[]), "counts is list"),
    # what `m3 inspect` and `m3 compact` read besides (a KeyError or TypeError traceback before)
    (lambda m: m["state"].pop("dead_refs"), "'dead_refs'"),
    (lambda m: m["sizes"].update(payload_bytes="12"), "sizes.payload_bytes = '12'"),
    (lambda m: m["config"].update(max_shard_bytes=None), "config.max_shard_bytes = None"),
    (lambda m: next(iter(m["state"]["shards"].values())).pop("live_kv_bytes"), "'live_kv_bytes'"),
    (lambda m: m["quant"].update(rel_err_max=None), "quant.rel_err_max = None"),
    (lambda m: m["model"].pop("n_heads"), "'n_heads'"),
    # hand edits an audit found reaching a traceback, a kb damaged by a compile, or a quiet misreading
    (lambda m: m["retrieval"]["fusion"].update(weights={}), "lacks the weights ['bm25', 'bm25_doc']"),
    (lambda m: m["retrieval"].update(mode="fast"), "mode 'fast'"),
    (lambda m: m["retrieval"]["bm25"].pop("tokenizer"), "'tokenizer'"),
    (lambda m: m["retrieval"]["bm25"].update(dir="../../elsewhere"), "leaves the kb directory"),
    (lambda m: m["config"].update(model=5), "config.model = 5"),
    (lambda m: m["state"].update(next_ref_id=-1), "state.next_ref_id = -1"),
    (lambda m: m["state"].update(shards={}), "state.shards hold 0 live"),
    (lambda m: m["write"].update(prefix_ids=[1, 2]), "not identity.prefix_ids"),
])
def test_a_manifest_missing_nested_keys_is_one_line(kb, change, fragment):
    kb_dir, _ = kb
    m = json.loads((kb_dir / "manifest.json").read_text())
    change(m)
    (kb_dir / "manifest.json").write_text(json.dumps(m))
    for command in (["inspect", str(kb_dir)], ["query", str(kb_dir), "w5"], ["compact", str(kb_dir)]):
        assert_one_line_error(runner.invoke(app, command), "the manifest is damaged", fragment)
    faults = verify_kb(kb_dir)  # verify names it as a fault instead of raising
    assert len(faults) == 1 and faults[0].startswith("manifest.json:") and fragment in faults[0], faults


@pytest.mark.parametrize("name", ["vocab.index.json", "params.index.json"])
def test_a_damaged_bm25_file_is_one_line(kb, name):
    kb_dir, _ = kb
    m = json.loads((kb_dir / "manifest.json").read_text())
    path = kb_dir / m["generation"] / m["retrieval"]["bm25"]["dir"] / name
    path.write_text("{not json")
    assert_one_line_error(runner.invoke(app, ["query", str(kb_dir), "w5"]), f"cannot read {path.parent}",
                          "m3 verify --repair")


def test_concurrent_compile_names_the_lock_holder(kb):
    from m3compile.store import KbLock

    kb_dir, cfg = kb
    before = files(kb_dir)
    with KbLock(kb_dir):  # held through another open file, as another process would hold it
        r = runner.invoke(app, ["compile", cfg.corpus, "-o", str(kb_dir), "--model", cfg.model])
    assert_one_line_error(r, f"pid {os.getpid()}", "lock")
    assert files(kb_dir) == before and not (kb_dir / ".m3.lock").exists()


@pytest.mark.parametrize("args, fragments", [
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--max-tokens", "100000"],
     ["--max-tokens 100000", "positions", "at most"]),
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--top-k", "100000"],
     ["--top-k 100000", "exceeds the reference width"]),
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--memory-layers", "3-1"], ["runs backwards"]),
    (["generate", "--kb", "{kb}", "Who", "--chunk-tokens", "0"], ["--chunk-tokens 0 must be at least 1"]),
    (["generate", "--kb", "{kb}", "w5 " * 3000], ["shorten the prompt"]),
    (["generate", "--kb", "{kb}", "w5", "--seed", str(2**64)], ["--seed 18446744073709551616 must be from -2^63 to 2^64 - 1"]),
    (["verify", "{kb}", "--recompute", "-1"], ["--recompute -1 must be 0 or more"]),
    (["compact", "{tmp}/nope"], ["is not a directory"]),
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--device", "cuda:7"], ["--device cuda:7"]),
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--device", "gpu"], ["--device 'gpu'"]),
    (["train", "--model", "{model}", "--kb", "{kb}", "--texts", "{corpus}", "-o", "{out}", "--device", "gpu"],
     ["--device 'gpu'"]),
    (["train", "--model", "{model}", "--kb", "{kb}", "--texts", "{corpus}", "-o", "{out}", "--lr", "-1e-3"],
     ["--lr -0.001 must be above 0"]),
    (["query", "{kb}", "w5", "-k", "0"], ["0 references asked for"]),
    (["query", "{kb}", "w5", "-k", "0", "--mode", "keys"], ["0 references asked for"]),  # before any memory is read
    (["inspect", "{kb}", "--ref", str(2**64)], [f"no reference {2**64}"]),
    (["eval", "{kb}", "{corpus}", "--refs", "0"], ["--refs 0 must be at least 1"]),
    (["eval", "{kb}", "{corpus}", "--max-text-tokens", "0"], ["--max-text-tokens 0 must be at least 1"]),
    (["compile", "{corpus}", "-o", "{out}", "--model", "{model}", "--embedder", "minlm"], ["--embedder minlm: not a directory"]),
])
def test_bad_flags_are_one_line(kb, args, fragments):
    kb_dir, cfg = kb
    before = files(kb_dir)
    subst = {"corpus": cfg.corpus, "out": str(kb_dir.parent / "out"), "model": cfg.model, "kb": str(kb_dir),
             "tmp": str(kb_dir.parent)}
    assert_one_line_error(runner.invoke(app, [a.format(**subst) for a in args]), *fragments)
    assert files(kb_dir) == before and not (kb_dir.parent / "out" / "manifest.json").exists()


def test_recompute_reports_what_it_did(kb):
    kb_dir, _ = kb
    n = json.loads((kb_dir / "manifest.json").read_text())["counts"]["references"]
    r = runner.invoke(app, ["verify", str(kb_dir), "--recompute", "100000", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"kb": str(kb_dir), "faults": [], "repaired": [], "recomputed": n}


def test_a_v1_manifest_of_0_1_0_stays_readable_and_compiles_into(tmp_path, monkeypatch):
    """Format v1 as m3compile 0.1.0 wrote it (identity by CLI spellings, paths as given) is read by
    this version, and a compile into it reuses every memory: the identity is the MemorySpec."""
    from test_golden_kb import build_example, kb_file

    from m3compile import manifest, pipeline, store
    from m3compile.index import build_indexes, index_texts

    # shards and shard index stamped `created_by` as 0.1.0 wrote them: the old manifest's sha256s
    for module in (manifest, pipeline):
        monkeypatch.setattr(module, "__version__", "0.1.0")
    kb_dir = build_example(tmp_path)
    old = json.loads((Path(__file__).parent / "data" / "kb-example-v1-0.1.0" / "manifest.json").read_text())
    # its generation as 0.1.0 wrote it: its table (beside its manifest: 0.1.0 wrote every column with
    # dictionary pages), the same shard index and tokenizer, a version-1 index
    new_gen = kb_dir / json.loads((kb_dir / "manifest.json").read_text())["generation"]
    old_table = Path(__file__).parent / "data" / "kb-example-v1-0.1.0" / refs_file.FILE_NAME
    rows = refs_file.read_references(old_table).to_pylist()
    assert rows == refs_file.read_references(new_gen / refs_file.FILE_NAME).to_pylist()

    def build(gen):
        shutil.copyfile(old_table, gen / refs_file.FILE_NAME)
        for name in ("memory.safetensors.index.json", "tokenizer.json"):
            shutil.copyfile(new_gen / name, gen / name)
        build_indexes(gen, [r["ref_id"] for r in rows], index_texts([r["doc_id"] for r in rows],
                      [r["index"] for r in rows], [r["text"] for r in rows]), None)
    assert store.write_generation(kb_dir, build) == old["generation"]
    (kb_dir / "manifest.json").write_text(json.dumps(old))
    assert verify_kb(kb_dir) == [] and open_kb(kb_dir).memory(0).keys.shape[-1] == 16
    cfg = CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=8, top_k=3,
                        quant="int8", prefix="w60")
    r = compile_kb(cfg, kb_dir)
    assert r.summary["references"]["encoded"] == 0 and r.summary["references"]["reused"] == 4
    # the kb a fresh compile (of the same version) writes, byte for byte
    fresh = build_example(tmp_path / "fresh")
    assert kb_file(kb_dir, "manifest.json").read_bytes() == kb_file(fresh, "manifest.json").read_bytes()


def test_verify_names_a_shard_whose_quant_is_not_the_kbs(kb):
    # readers decode every shard with the manifest's scheme: a shard that says another, with a
    # manifest that vouches for its bytes (an independent writer's mistake), decoded silently
    import hashlib
    import struct

    kb_dir, _ = kb
    m = json.loads((kb_dir / "manifest.json").read_text())
    name = sorted(m["state"]["shards"])[0]
    data = (kb_dir / name).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"]["quant"] == m["quant"]["scheme"]
    header["__metadata__"]["quant"] = "none-float16"
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    data = struct.pack("<Q", len(head)) + head + data[8 + n:]
    (kb_dir / name).write_bytes(data)
    m["files"][name] = {**m["files"][name], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (kb_dir / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    faults = verify_kb(kb_dir)
    assert faults[0] == f"{name}: its quant 'none-float16' is not the kb's {m['quant']['scheme']!r}", faults
    # and the CLI's hint is the fix that works: a repair finds the shard's bytes the recorded ones
    from typer.testing import CliRunner

    from m3compile.cli import app
    r = CliRunner().invoke(app, ["verify", str(kb_dir)])
    assert r.exit_code == 1 and "--rebuild` writes it anew" in r.output and "verify --repair" not in r.output, r.output
