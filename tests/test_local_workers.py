"""The local engine on worker processes (`m3 compile --workers N`, distribute.pool_frames): the bytes
of one process, codebooks in the workers, a killed worker as one error with nothing lost."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import check_lazy_engine
from m3compile.config import CompileConfig
from m3compile.errors import M3Error
from m3compile.pipeline import compile_kb

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus"  # 24 articles, 86 references with the embedded model


def snapshot(kb: Path) -> dict:
    return {p.relative_to(kb).as_posix(): p.read_bytes() for p in kb.rglob("*")
            if p.is_file() and p.name not in ("run.json", ".m3.lock")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The kb of the embedded model's example corpus, encoded in this process."""
    kb = tmp_path_factory.mktemp("one") / "kb"
    cfg = CompileConfig(corpus=str(CORPUS), batch_size=8, checkpoint_seconds=0)
    result = compile_kb(cfg, kb)
    assert result.summary["engine_workers"] == 1
    return cfg, kb


def test_worker_processes_write_the_bytes_of_one_process(one_process, tmp_path, monkeypatch):
    import m3compile.pipeline as pipeline

    cfg, kb = one_process
    # the workers load the model; this process, which only plans and writes, does not
    monkeypatch.setattr(pipeline._Checkpoint, "model", property(lambda ck: pytest.fail("the driver loaded the model")))
    result = compile_kb(replace(cfg, workers=2), tmp_path / "kb")
    assert result.summary["engine_workers"] == 2
    run = json.loads((tmp_path / "kb" / "run.json").read_text())
    assert run["workers"] == 2 and "encode (waiting for workers)" in run["stage_seconds"]
    assert "encode+select" not in run["stage_seconds"]  # the driver encoded nothing itself
    assert snapshot(tmp_path / "kb") == snapshot(kb)


def test_codebooks_travel_to_the_worker_processes(tmp_path):
    cfg = CompileConfig(corpus=str(CORPUS), batch_size=8, quant="vq-pq4", codebook_sample=64)
    compile_kb(cfg, tmp_path / "one")
    compile_kb(replace(cfg, workers=2), tmp_path / "two")
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_a_killed_worker_is_one_error_and_the_rerun_gives_the_same_bytes(one_process, tmp_path, monkeypatch):
    cfg, kb = one_process
    mark = tmp_path / "crash-mark"
    # the workers inherit these: the first to reach batch 4 SIGKILLs itself, once (distribute._crash_once)
    monkeypatch.setenv("M3_CRASH_AT", "pool-batch:4")
    monkeypatch.setenv("M3_CRASH_MARK", str(mark))
    with pytest.raises(M3Error, match="worker process failed or died .* run the same command again to resume"):
        compile_kb(replace(cfg, workers=2), tmp_path / "kb")
    assert mark.is_file()  # a worker did die
    assert not (tmp_path / "kb" / "manifest.json").exists()  # nothing committed
    result = compile_kb(replace(cfg, workers=2), tmp_path / "kb")
    assert result.summary["references"]["copied"] > 0  # checkpointed frames were not encoded again
    assert snapshot(tmp_path / "kb") == snapshot(kb)


def test_the_cli_runs_workers_when_asked(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "m3compile", "compile", str(CORPUS), "-o", str(tmp_path / "kb"), "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "kb" / "run.json").read_text())["summary"]["engine_workers"] == 2
    bad = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--workers 0 must be at least 1" in bad.stderr
    assert CompileConfig(corpus=".").workers is None  # the default: this process alone


def test_worker_processes_take_the_batches_lazily():
    """pool_frames pulls POOL_AHEAD batches per worker ahead of the one it yields, not the whole
    plan (ProcessPoolExecutor.map submits everything at once), and yields the frames the local
    engine makes, in order."""
    from m3compile import distribute
    from m3compile.config import default_model_dir

    check_lazy_engine(lambda path, spec, batches: distribute.pool_frames(path, spec, batches, "cpu", 2, 1),
                      distribute.POOL_AHEAD * 2)

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started for nothing to encode")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distribute, "ProcessPoolExecutor", no_pool)
        # nothing is read of the model or the spec before the first batch
        assert list(distribute.pool_frames(default_model_dir(), None, iter([]), "cpu", 2, 1)) == []


def test_ray_calls_carry_the_batches_as_int32():
    from m3compile.distribute import _pack_tokens, _unpack_tokens

    batch = [[1, 2, 3], [2**31 - 1], [0, 7]]
    assert _unpack_tokens(_pack_tokens(batch)) == batch
    assert len(_pack_tokens(batch)) == 4 + 4 * 3 + 4 * 6


def test_ray_chunking_packs_references_and_cuts_as_chunk_documents():
    """What the Ray engine's chunking actors do, without Ray: _Chunker cuts a block of documents into
    chunk_documents' references, they travel packed, and the corpus goes in windows of characters."""
    from m3compile import distribute
    from m3compile.chunk import chunk_documents
    from m3compile.config import default_model_dir
    from m3compile.corpus import Document
    from m3compile.errors import M3Error
    from m3compile.tokenizer import Tokenizer
    import tokenizers

    tok = Tokenizer.from_dir(default_model_dir())
    doc = Document("a/b.md", "a/b.md", (CORPUS / "diavhollow.md").read_text() * 3 + "Ünïcode – ✓ end.")
    want = list(chunk_documents([doc], tok, 32, "sentence", 0.75))
    chunker = distribute._Chunker(tok.hf.to_str(), tok.bos_id, tok.eos_id, tokenizers.__version__, 32, "sentence",
                                  0.75)
    other = Document("c.md", "c.md", (CORPUS / "diavhollow.md").read_text()[:500])
    out = chunker({"j": np.array([4, 5]), "text": np.array([doc.text, other.text], object)})  # a block of Ray Data
    assert out["j"].tolist() == [4, 5] and len(out["refs"]) == 2
    got = list(distribute._unpack_references(out["refs"][0], doc))
    assert len(want) > 3 and got == want
    assert list(distribute._unpack_references(out["refs"][1], other)) == list(chunk_documents([other], tok, 32,
                                                                                                "sentence", 0.75))
    assert list(distribute._unpack_references(distribute._pack_references([]), doc)) == []
    with pytest.raises(M3Error, match=r"this Ray node has tokenizers \S+ and the driver 0.0.1, which may cut"):
        distribute._Chunker(tok.hf.to_str(), None, None, "0.0.1", 32, "sentence", 0.75)
    docs = [Document(str(n), "", "x" * n) for n in (3, 4, 20, 1, 1, 9, 2)]
    windows = [[d.doc_id for d in w] for w in distribute._document_windows(iter(docs), 5)]
    # a window closes at >= 5 characters; a longer document is a window alone, its neighbours apart
    assert windows == [["3", "4"], ["20"], ["1", "1"], ["9"], ["2"]]


def test_a_worker_whose_model_does_not_load_says_why(one_process, tmp_path):
    # an error in a worker's start only broke the pool ("failed or died ... run the same command
    # again"); the worker's own message is the error now (here: no CUDA for --device cuda, which
    # the driver, loading no model with workers, never tried)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda loads")
    cfg, _ = one_process
    with pytest.raises(M3Error, match="worker process could not load the model: .*cuda"):
        compile_kb(replace(cfg, workers=2, device="cuda"), tmp_path / "kb")


def test_worker_processes_end_when_the_compile_is_killed(tmp_path):
    # killed by SIGKILL (the OOM killer), the driver runs no cleanup; its spawned workers, waiting on
    # a queue whose ends they hold themselves, lived on with a model each, and a resume started more
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(60):  # enough references that the workers are still encoding when the driver dies
        for p in sorted(CORPUS.iterdir()):
            (corpus / f"{k}-{p.name}").write_text(p.read_text() + f"\nCopy {k}.\n")

    def children(pid):
        out = []
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                    out.append(int(d))
            except OSError:
                pass
        return out

    driver = subprocess.Popen([sys.executable, "-m", "m3compile", "compile", str(corpus), "-o", str(tmp_path / "kb"),
                               "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline, workers = time.time() + 120, []
        while time.time() < deadline and len(workers) < 2 and driver.poll() is None:
            time.sleep(0.2)  # the pool is started once the plan is made
            workers = [c for c in children(driver.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        time.sleep(3)  # loading or encoding: either way they must go with the driver
        assert len(workers) >= 2 and driver.poll() is None, (workers, driver.poll())
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and
                                             open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                                             for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if os.path.exists(f"/proc/{w}")
                 and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, alive
    finally:
        driver.kill()
        for w in workers + children(driver.pid):  # reparented once the driver is gone
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
