"""The Ray engine (`m3 compile --engine ray`, m3compile/distribute.py) on a local Ray cluster that
these tests start themselves: the bytes of the local engine, after a worker is killed mid-job, and
after the driver is killed and the compile resumed."""

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import check_lazy_engine, run_cli
from m3compile.config import CompileConfig
from m3compile.errors import M3Error
from m3compile.kb import open_kb
from m3compile.pipeline import compile_kb

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus"  # 24 articles, 86 references with the embedded model

ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra: pip install 'm3compile[ray]'")
pytestmark = pytest.mark.slow  # a Ray cluster takes seconds to start


def snapshot(kb: Path) -> dict:
    return {p.relative_to(kb).as_posix(): p.read_bytes() for p in kb.rglob("*")
            if p.is_file() and p.name not in ("run.json", ".m3.lock")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster of 2 CPUs. Its workers inherit M3_CRASH_AT=ray-batch:3,ray-chunk:1 and a mark
    file for each: the worker hook (distribute._crash_once) kills the actor that encodes batch 3, or
    the actor that cuts the second document of a window, only while that mark file is absent."""
    tmp = tmp_path_factory.mktemp("ray")
    mark, chunk_mark = tmp / "crash-mark", tmp / "chunk-crash-mark"
    for m in (mark, chunk_mark):
        m.write_text("armed by deleting this file")
    saved = {k: os.environ.get(k) for k in ("M3_CRASH_AT", "M3_CRASH_MARK")}
    os.environ.update(M3_CRASH_AT="ray-batch:3,ray-chunk:1", M3_CRASH_MARK=f"{mark},{chunk_mark}")
    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for k, v in saved.items():  # the driver (this process) must not crash at any point
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v
    local = tmp / "local"
    cfg = CompileConfig(corpus=str(CORPUS), batch_size=8, checkpoint_seconds=0)
    compile_kb(cfg, local)
    yield {"address": info.address_info["address"], "mark": mark, "chunk_mark": chunk_mark, "local": local, "cfg": cfg,
           "tmp": tmp}
    ray.shutdown()


def local_references(cluster) -> int:
    """References in the local engine's kb of the same corpus: what a whole compile encodes."""
    return open_kb(cluster["local"]).manifest.counts["references"]


def test_ray_engine_writes_the_bytes_of_the_local_engine(cluster, tmp_path):
    from dataclasses import replace

    result = compile_kb(replace(cluster["cfg"], engine="ray", workers=2), tmp_path / "kb")
    assert result.summary["references"]["encoded"] == local_references(cluster) > 0
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])
    run = json.loads((tmp_path / "kb" / "run.json").read_text())
    assert run["engine"] == "ray" and run["workers"] == 2 and "encode (waiting for ray)" in run["stage_seconds"]
    # the engine is a run setting: the local engine finds the kb up to date
    assert compile_kb(cluster["cfg"], tmp_path / "kb").summary["references"]["encoded"] == 0


def test_vq_codebooks_travel_to_the_actors(cluster, tmp_path):
    # the codebooks are trained in the driver; the actors rebuild them from their tensors
    from dataclasses import replace

    cfg = replace(cluster["cfg"], quant="vq-pq4")
    compile_kb(cfg, tmp_path / "local")
    compile_kb(replace(cfg, engine="ray", workers=2), tmp_path / "ray")
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")


def test_a_worker_killed_mid_job_changes_nothing(cluster, tmp_path):
    from dataclasses import replace

    cluster["mark"].unlink()  # arm the worker hook: the actor encoding batch 3 SIGKILLs itself once
    compile_kb(replace(cluster["cfg"], engine="ray", workers=2), tmp_path / "kb")
    assert cluster["mark"].is_file(), "no worker was killed: the test did not test anything"
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])


def test_windows_of_the_corpus_give_the_same_bytes_with_a_worker_killed(cluster, tmp_path, monkeypatch):
    """The driver hands Ray the corpus a window at a time (distribute._document_windows): here 400
    characters of documents a window, documents longer than that cut in the driver, the rest by
    chunking actors; the encoding actor that gets batch 3 dies once. The kb is the local engine's."""
    from dataclasses import replace

    from m3compile import distribute

    monkeypatch.setattr(distribute, "WINDOW_CHARS", 200)  # per actor; 2 actors
    cut, unpacked = [], []  # windows of documents; documents whose references came back from an actor
    real_docs, real_unpack = distribute._document_windows, distribute._unpack_references

    def documents(docs, chars):
        for w in real_docs(docs, chars):
            cut.append(([d.doc_id for d in w], sum(len(d.text) for d in w)))
            yield w

    monkeypatch.setattr(distribute, "_document_windows", documents)
    monkeypatch.setattr(distribute, "_unpack_references", lambda data, doc: (unpacked.append(doc.doc_id),
                                                                            real_unpack(data, doc))[1])
    cluster["mark"].unlink()  # arm the worker hook
    compile_kb(replace(cluster["cfg"], engine="ray", workers=2), tmp_path / "kb")
    assert cluster["mark"].is_file(), "no worker was killed: the test did not test anything"
    alone = [ids for ids, n in cut if len(ids) == 1 and n > 400]  # longer than a window: cut in the driver
    assert len(alone) >= 2 and len(cut) - len(alone) >= 5 and sum(len(ids) for ids, _ in cut) == 24
    on_ray = [i for ids, n in cut if n >= 200 and ids not in alone for i in ids]  # under half a window: the driver
    assert len(on_ray) >= 10 and sorted(unpacked) == sorted(on_ray)
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])


def test_a_chunking_actor_killed_mid_job_changes_nothing(cluster, tmp_path, monkeypatch):
    """Ray Data cuts windows of documents on _Chunker actors; the one cutting the second document
    of a window dies (its first window on Ray), Ray Data restarts it and runs the rows again."""
    from dataclasses import replace

    from m3compile import distribute

    monkeypatch.setattr(distribute, "WINDOW_CHARS", 200)  # per actor; 2 actors: windows of ~400 characters
    unpacked = []  # documents whose references came back from an actor
    real_unpack = distribute._unpack_references
    monkeypatch.setattr(distribute, "_unpack_references", lambda data, doc: (unpacked.append(doc.doc_id),
                                                                            real_unpack(data, doc))[1])
    cluster["chunk_mark"].unlink()  # arm the chunking hook only
    compile_kb(replace(cluster["cfg"], engine="ray", workers=2), tmp_path / "kb")
    assert cluster["chunk_mark"].is_file(), "no chunking actor was killed: the test did not test anything"
    assert cluster["mark"].is_file() and len(unpacked) >= 10
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])


def test_encoding_actors_take_the_batches_lazily(cluster):
    """ray_frames keeps RAY_AHEAD calls per actor in flight, not the plan, and yields the frames
    the local engine makes, in order."""
    from m3compile import distribute

    session = distribute.RaySession(cluster["address"])  # joins the test's cluster
    check_lazy_engine(lambda path, spec, batches: distribute.ray_frames(session, path, spec, batches, "cpu", 2, 0.0, 1),
                      distribute.RAY_AHEAD * 2, n_batches=13)
    session.close()


def test_more_actors_than_a_local_cluster_holds_is_one_error_line(tmp_path):
    # a cluster the compile starts itself cannot grow: Ray would wait for the CPUs forever
    r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray", "--workers", "2",
                 "--cpus-per-worker", "4096"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --workers 2 x --cpus-per-worker 4096 needs 8192 CPUs and the local Ray cluster has "), r.stderr
    assert not (tmp_path / "kb" / "manifest.json").exists()


def test_an_error_in_an_actor_is_one_m3_error(cluster, tmp_path, monkeypatch, capsys):
    """A chunking actor that refuses to start (here: the driver claims another tokenizers version)
    fails the compile with the actor's own M3Error, no Ray Data error lines on the console, and
    nothing committed."""
    from dataclasses import replace

    import tokenizers

    from m3compile import distribute

    monkeypatch.setattr(distribute, "WINDOW_CHARS", 200)  # the example corpus is cut on Ray
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")
    with pytest.raises(M3Error, match=r"^this Ray node has tokenizers \S+ and the driver 0.0.1, which may cut "
                                      r"references differently; install the same version on every node$"):
        compile_kb(replace(cluster["cfg"], engine="ray", workers=2), tmp_path / "kb")
    assert not (tmp_path / "kb" / "manifest.json").exists()
    # Ray Data's error lines stay off the console; the raylet may still report, late, the workers the
    # tests before this one killed ("(raylet) ... SYSTEM_ERROR Worker exit detail: ..."), which is Ray's own
    err = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert all("SYSTEM_ERROR" in line and "Worker" in line for line in err), err


def test_json_output_stays_json_when_an_actor_dies(cluster, tmp_path):
    # Ray's driver prints the cluster's messages about a failed task to stdout; --json writes there
    cluster["mark"].unlink()  # arm the worker hook: the actor encoding batch 3 SIGKILLs itself once
    r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray", "--ray-address", cluster["address"],
                 "--batch-size", "8", "--checkpoint-seconds", "0", "--json"])
    assert r.returncode == 0, r.stderr
    assert cluster["mark"].is_file(), "no worker was killed: the test did not test anything"
    assert json.loads(r.stdout)["summary"]["references"]["encoded"] == local_references(cluster)
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])


def test_a_killed_driver_resumes_to_the_same_bytes(cluster, tmp_path):
    args = ["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray", "--ray-address", cluster["address"],
            "--batch-size", "8", "--checkpoint-seconds", "0"]
    killed = run_cli(args, {"M3_CRASH_AT": "batch:5"})  # the driver SIGKILLs itself after writing batch 5
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(args + ["--json"])
    assert resumed.returncode == 0, resumed.stderr
    refs = json.loads(resumed.stdout)["summary"]["references"]
    assert refs["copied"] == 40 and refs["encoded"] == 46  # 5 checkpointed batches of 8 are not sent again
    assert snapshot(tmp_path / "kb") == snapshot(cluster["local"])


def test_an_unreachable_cluster_is_one_error_line(tmp_path):
    # no cluster at this address: an M3Error naming it, before anything is written
    r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray", "--ray-address", "127.0.0.1:9"])
    assert r.returncode == 1 and r.stderr.strip().startswith("error: cannot connect to Ray at 127.0.0.1:9"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "kb" / "manifest.json").exists()
    # the same through RAY_ADDRESS, which --ray-address defaults to (ray.init retried it for minutes)
    r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray"], {"RAY_ADDRESS": "127.0.0.1:9"})
    assert r.returncode == 1 and r.stderr.strip().startswith("error: cannot connect to Ray at 127.0.0.1:9"), r.stderr


def test_a_port_that_is_not_a_ray_cluster_is_one_error_line(tmp_path):
    # an open port that is not Ray's GCS (here an HTTP server, as the dashboard's 8265 is): ray.init
    # retried it for minutes; the compile names it at once
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", "--engine", "ray", "--ray-address", address],
                    timeout=120)  # ray.init itself gives up after minutes
    finally:
        server.shutdown()
    assert r.returncode == 1 and r.stderr.startswith(
        f"error: {address} takes connections but does not answer as a Ray cluster"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "kb").exists()


@pytest.mark.parametrize("args, message", [
    (["--engine", "spark"], "--engine 'spark' is not one of local, ray"),
    (["--engine", "ray", "--workers", "0"], "--workers 0 must be at least 1"),
    (["--engine", "ray", "--gpus-per-worker", "1"], "--gpus-per-worker 1.0 gives the actors GPUs that --device cpu"),
    (["--engine", "ray", "--device", "cuda"], "--engine ray --device cuda gives the actors no GPU"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address sets up the Ray engine, which --engine local does not use"),
    (["--device", "cuda", "--gpus-per-worker", "1"], "--gpus-per-worker sets up the Ray engine"),
])
def test_bad_engine_flags_are_one_error_line(tmp_path, args, message):
    r = run_cli(["compile", CORPUS, "-o", tmp_path / "kb", *args])
    assert r.returncode == 1 and r.stderr.startswith(f"error: {message}"), r.stderr
    assert not (tmp_path / "kb").exists()


def test_config_rejects_a_bad_engine():
    with pytest.raises(M3Error, match="--engine 'dask'"):
        CompileConfig(corpus="c", engine="dask")
