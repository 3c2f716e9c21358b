"""Where the map steps of a compile run: documents become references, and the encode batches of
a plan become frames, in order.

A compile's main map step is `encode_frames`: memorize a batch of references (forward, select) and
quantize + compress each memory into a frame (pack.encode_payload). With `--engine ray` cutting
documents into references (chunk.chunk_documents) is one too. Everything else (reading, planning,
writing shards, the generation, the manifest) stays in the driver, pipeline.py.

  local   the batches are encoded one after another in this process (`local_frames`), or, with
          `--workers N`, by N worker processes on this machine, one model and --cpus-per-worker
          torch threads each, results in batch order (`pool_frames`): torch splits a small model's
          matmuls poorly across threads, and processes do not share them. The bytes are the same
          (tests/test_local_workers.py). Not the default: each worker holds a copy of the model,
          and spawned workers import the caller's __main__, which a script without an
          `if __name__ == "__main__":` guard would run again. At most POOL_AHEAD batches per
          worker are queued at once, so the driver holds a bounded share of the plan (issue 16).
  ray     (`m3 compile --engine ray`, the `[ray]` extra) one connection per compile (`RaySession`).
          The documents to cut are Ray Datasets, a window of about WINDOW_CHARS characters per
          actor at a time, cut by a pool of `_Chunker` actors, which get the driver's
          tokenizer.json text and must run its `tokenizers` version and chunk rule
          (`ray_references`); a window of under half that, or a document longer than a window, is
          cut in the driver. The batches are encoded by `_Encoder` actors started once per compile,
          one model each, with GPUs per actor when asked (`ray_frames`), a few calls per actor in
          flight. Results come back to the driver in order (Ray Data's preserve_order; the
          encoding calls are collected in batch order), so the driver plans and writes exactly what
          the local engine does: the same documents through the same chunk_documents give the same
          references, the same batches through the same `encode_frames` the same frames
          (tests/test_distribute.py compares the kb bytes). Neither step holds more than a window
          or a few batches in the driver, so its memory does not grow with the corpus (issue 16).
          A killed actor is restarted, and its block of documents (Ray Data) or its encoding calls
          (max_task_retries) run again; a result depends only on its input, so nothing in the kb
          changes. A driver killed mid-job resumes like the local engine: frames checkpointed to
          .spill/ or in written shards are copied, not sent to the workers again.

The encoding actors need the model at the same path (a shared filesystem on a real cluster); each
checks the weights' sha256 against the spec before encoding, so a different checkpoint at that path
on some node is an error, not a silently mixed kb. This module imports torch only where tensors are
made, so the chunking actors do not load it.
"""

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stdout
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from m3compile.chunk import CHUNK_RULE_VERSION, Reference, chunk_documents
from m3compile.corpus import Document
from m3compile.errors import M3Error
from m3compile.pack import encode_payloads
from m3compile.spec import MemorySpec, memorize

# encode batches queued or encoding per worker process (pool_frames): every worker has its next batch
# waiting while the driver writes, and the driver holds 2 x workers batches, not the whole plan
POOL_AHEAD = 2
# encode calls queued or running per Ray actor (ray_frames): each actor has its next batch waiting
# while it encodes one and the driver writes another
RAY_AHEAD = 3
# characters of documents per actor in one Ray chunking window (ray_references); a document longer
# than a window is cut in the driver, which cuts any document in bounded memory (chunk.encode_windows)
WINDOW_CHARS = 1 << 22
CONNECT_TIMEOUT_S = 10  # a --ray-address that accepts no TCP connection in this time is an error
Frames = list[tuple[bytes, float, float, int]]  # (frame, relative error, max abs error, K) per reference


def encode_frames(model, spec: MemorySpec, token_lists: Sequence[Sequence[int]],
                  timer: Callable[[str], object] | None = None) -> Frames:
    """(frame, relative error, max abs error, K) of each reference: memorize, then quantize+pack.

    Errors are rounded to float32, as the references table and the shards store them, so a frame
    copied later reports the same figures."""
    import torch  # here: the chunking actors import this module and need no torch

    stage = timer or (lambda name: nullcontext())
    with stage("encode+select"):
        memories = memorize(model, token_lists, spec)
    out = [None] * len(memories)
    with stage("quantize+compress"):
        # references of one shape (all but those shorter than top_k) are quantized together
        groups = defaultdict(list)
        for i, mem in enumerate(memories):
            groups[tuple(mem.keys.shape)].append(i)
        for idx in groups.values():
            ms = [memories[i] for i in idx]
            coded = encode_payloads(torch.stack([m.keys for m in ms]), torch.stack([m.values for m in ms]),
                                    torch.stack([m.positions for m in ms]), spec.scheme)
            for i, (frame, err) in zip(idx, coded, strict=True):
                out[i] = (frame, float(np.float32(err.rel)), float(np.float32(err.max_abs)),
                          memories[i].positions.shape[-1])
    return out


def local_frames(model, spec: MemorySpec, batches: Iterable[list[list[int]]], timer=None) -> Iterator[Frames]:
    """The local engine: each batch encoded here, lazily, in order."""
    for batch in batches:
        yield encode_frames(model, spec, batch, timer)


# ---- the local engine with worker processes ---------------------------------------------------------

_pool_encoder: "_Encoder | None" = None  # the model of this worker process (pool_frames)
_pool_failed: str | None = None  # why this worker's model did not load: said by its first batch
PARENT_POLL_SECONDS = 1.0  # how often a worker process looks whether the compile that started it is gone


def _exit_with_parent(parent: int) -> None:
    """End this worker process when the compile that spawned it is gone. Killed (SIGKILL, the OOM
    killer), the driver runs no cleanup, and a worker waiting on the pool's queue, whose ends it
    holds itself, would wait forever, holding a model (a resume would start N more)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="m3-parent-watch", daemon=True).start()


def _pool_start(model_path: str, fields: dict, codebooks: tuple | None, device: str, threads: int,
                parent: int) -> None:
    global _pool_encoder, _pool_failed
    # Ctrl-C reaches the whole process group: the driver stops the pool; each worker saying so with
    # a traceback of its own would bury the driver's one line
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    try:
        _pool_encoder = _Encoder(model_path, fields, codebooks, device, threads)
    except Exception as e:  # raised from the first batch: an initializer's error only breaks the pool
        _pool_failed = str(e) if isinstance(e, M3Error) else f"{type(e).__name__}: {e}"


def _pool_encode(item: tuple[int, list[list[int]]]) -> bytes:
    i, tokens = item
    if _pool_failed is not None:
        raise M3Error(f"a compile worker process could not load the model: {_pool_failed}")
    _crash_once(f"pool-batch:{i}")
    return _pack_result(encode_frames(_pool_encoder.model, _pool_encoder.spec, tokens))


def pool_frames(model_path: Path, spec: MemorySpec, batches: Iterable[list[list[int]]], device: str,
                workers: int, threads_per_worker: int) -> Iterator[Frames]:
    """The local engine on `workers` processes of this machine (spawned: a fork would copy the
    parent's OpenMP state), each with its own model and `threads_per_worker` torch threads;
    frames yielded in batch order. `batches` is taken lazily, POOL_AHEAD per worker ahead of the
    batch yielded (ProcessPoolExecutor.map would submit them all at once). A worker that dies
    (killed, out of memory) or fails ends the compile with one error; what was written and
    checkpointed before stays, and the same command resumes from there."""
    items = enumerate(batches)
    first = next(items, None)
    if first is None:
        return  # nothing to encode: no worker is started
    fields, codebooks = _spec_for_workers(spec)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_start,
                               initargs=(str(model_path), fields, codebooks, device, threads_per_worker, os.getpid()))
    try:
        for data in _in_order(first, items, lambda item: pool.submit(_pool_encode, item), lambda f: f.result(),
                              POOL_AHEAD * workers):
            yield _unpack_result(data)
    except BrokenProcessPool:
        raise M3Error(f"a compile worker process failed or died (killed, or out of memory with {workers} "
                      "workers); the frames encoded so far are checkpointed: run the same command again to "
                      "resume, with --workers 1 if memory is short") from None
    finally:  # also when the driver stops early: queued batches are dropped, not encoded
        pool.shutdown(wait=True, cancel_futures=True)


# ---- the Ray engine ----------------------------------------------------------------------------------

def _pack_result(frames: Frames) -> bytes:
    """One batch's frames as one binary cell: a JSON line of (length, rel, max, K), then the frames."""
    head = json.dumps([[len(f), rel, mx, k] for f, rel, mx, k in frames]).encode()
    return head + b"\n" + b"".join(f for f, _, _, _ in frames)


def _in_order(first, items: Iterator, submit: Callable, result: Callable, ahead: int) -> Iterator:
    """result(submit(item)) for `first`, then each of `items`, in order, with `ahead` calls queued or
    running: the next is submitted before the caller gets a result (its workers run while the
    driver writes), and `items` is taken no further than that (pool_frames, ray_frames)."""
    pending = deque(submit(item) for item in chain([first], islice(items, ahead - 1)))
    while pending:
        done = result(pending.popleft())
        pending.extend(submit(item) for item in islice(items, 1))
        yield done


def _pack_tokens(batch: Sequence[Sequence[int]]) -> bytes:
    """One batch's token lists as one binary cell: their count, their lengths, then the ids, int32
    little-endian (4 bytes a token where a JSON list took ~6 and a Python list ~36)."""
    lengths = np.fromiter(map(len, batch), np.int32, len(batch))  # (n,)
    ids = np.fromiter(chain.from_iterable(batch), np.int32, int(lengths.sum()))  # (tokens,)
    return struct.pack("<i", len(batch)) + lengths.astype("<i4").tobytes() + ids.astype("<i4").tobytes()


def _unpack_tokens(data: bytes) -> list[list[int]]:
    (n,) = struct.unpack_from("<i", data)
    lengths = np.frombuffer(data, "<i4", n, 4)  # (n,)
    ids = np.frombuffer(data, "<i4", offset=4 + 4 * n)  # (tokens,)
    return [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]


def _unpack_result(data: bytes) -> Frames:
    cut = data.index(b"\n")
    out, at = [], cut + 1
    for n, rel, mx, k in json.loads(data[:cut]):
        out.append((data[at:at + n], rel, mx, k))
        at += n
    return out


def _crash_once(name: str) -> None:
    """Test hook: M3_CRASH_AT=<name> SIGKILLs this worker the first time it gets here (the file
    M3_CRASH_MARK records that it did), as a node failure would; its retry then runs normally.
    Both may list several, comma-separated and paired: M3_CRASH_AT=a,b M3_CRASH_MARK=mark_a,mark_b."""
    names = os.environ.get("M3_CRASH_AT", "").split(",")
    marks = os.environ.get("M3_CRASH_MARK", "").split(",")
    if name not in names or names.index(name) >= len(marks):
        return
    mark = marks[names.index(name)]
    if mark and not os.path.exists(mark):
        Path(mark).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def _spec_for_workers(spec: MemorySpec) -> tuple[dict, tuple | None]:
    """What a worker process or actor rebuilds `spec` from (_Encoder): its fields, and its
    codebooks as tensors (None without VQ)."""
    codebooks = spec.codebooks.to_tensors() if spec.codebooks is not None else None
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__ if k != "codebooks"}, codebooks


class _Encoder:
    """A Ray actor (ray_frames), or the model of a local worker process (pool_frames): loads the
    model once, checks it is the spec's, encodes batches."""

    def __init__(self, model_path: str, spec_fields: dict, codebooks: tuple | None, device: str, threads: int):
        import torch

        from m3compile.checkpoint import fingerprint
        from m3compile.model import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        spec = MemorySpec(**spec_fields)
        if codebooks is not None:
            from m3compile.vq import Codebooks

            tensors, meta = codebooks
            spec = spec.with_codebooks(Codebooks.from_tensors(tensors, meta), spec.codebooks_sha256)
        digests = tuple(sorted(fingerprint(Path(model_path))["weights_sha256"].items()))
        if digests != spec.model_weights_sha256:
            raise M3Error(f"the model at {model_path} on this Ray node is not the checkpoint the compile "
                          "started with (weight sha256 differ); give every node the same files")
        self.spec = spec
        self.model = load_checkpoint(model_path, device=device, dtype=spec.dtype).model

    def encode(self, i: int, tokens: bytes) -> bytes:
        """Batch i (_pack_tokens) as its frames (_pack_result): a Ray actor's call."""
        _crash_once(f"ray-batch:{i}")
        return _pack_result(encode_frames(self.model, self.spec, _unpack_tokens(tokens)))


def check_ray(address: str | None) -> None:
    """M3Error now, before any corpus is read, if Ray is not installed, or `address` takes no TCP
    connection or answers as no gRPC server does (ray.init would retry either for minutes)."""
    try:
        import ray
    except ImportError:
        raise M3Error("--engine ray needs Ray: pip install 'm3compile[ray]'") from None
    address = address or os.environ.get("RAY_ADDRESS")  # ray.init reads it when no --ray-address is given
    if ray.is_initialized() or not address or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        conn = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as e:
        raise M3Error(f"cannot connect to Ray at {address} ({getattr(e, 'strerror', None) or e}); start a "
                      "cluster with `ray start --head` and pass the address it prints (host:6379) to "
                      "--ray-address") from None
    with conn:
        answer = None if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true") else _http2_answer(conn)
    if answer is not None and not (len(answer) == 9 and answer[3] == HTTP2_SETTINGS):
        raise M3Error(f"{address} takes connections but does not answer as a Ray cluster (its GCS speaks "
                      f"gRPC; this port answered {answer[:16]!r}): pass the address `ray start --head` prints "
                      "(host:6379), not the dashboard's (8265) or Ray Client's (10001)")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame
HTTP2_SETTINGS = 4  # frame type; a frame header is 9 bytes: length (3), type, flags, stream id (4)


def _http2_answer(conn: socket.socket) -> bytes | None:
    """The first 9 bytes a server sends back to an HTTP/2 client's preface: a gRPC server (Ray's
    GCS) opens with its SETTINGS frame; anything else on that port makes ray.init retry for
    minutes. None where the exchange itself failed (left to ray.init to report); a TLS cluster
    (RAY_USE_TLS) is not probed."""
    try:
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.sendall(HTTP2_PREFACE)
        got = b""
        while len(got) < 9:
            part = conn.recv(9 - len(got))
            if not part:
                break
            got += part
        return got
    except socket.timeout:
        return b""  # silent: no gRPC server
    except OSError:
        return None


def _quiet_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextmanager
def _ray_cluster(address: str | None):
    check_ray(address)
    import ray
    import ray.data  # its import configures the "ray.data" logger (DEBUG, INFO to the console) ...

    data_log = logging.getLogger("ray.data")
    data_log.setLevel(logging.WARNING)  # ... whose per-dataset INFO lines are not the user's
    for handler in data_log.handlers:  # nor its errors on the console: a failure is one M3Error (_ray_error)
        if isinstance(handler, logging.StreamHandler) and _quiet_errors not in handler.filters:
            handler.addFilter(_quiet_errors)
    # nor its notice that the progress bars we turn off (the CLI shows its own) are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    started = not ray.is_initialized()
    if started:
        try:
            # no address: a local cluster on this machine (or RAY_ADDRESS's, as `ray` itself reads it)
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:  # RayError: authentication
            where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            fix = "start one with `ray start --head` and pass its address to --ray-address"
            if where != "a new local cluster" and not os.environ.get("RAY_AUTH_MODE") and \
                    (Path.home() / ".ray" / "auth_token").is_file():
                # Ray >= 2.5x starts a head with token authentication once this machine has a token
                # (a local ray.init writes one), and a client given an address does not send it
                fix = ("if the cluster runs with Ray's token authentication (this machine has "
                       "~/.ray/auth_token), set RAY_AUTH_MODE=token for the compile; else " + fix)
            raise M3Error(f"cannot connect to Ray at {where}: {str(e).splitlines()[0][:200]}; {fix}") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class RaySession:
    """One Ray connection for a whole compile, made when the chunking or the encoding first needs
    it and closed with the compile (pipeline._run), so a compile starts (or joins) a cluster once."""

    def __init__(self, address: str | None):
        self.address = address
        self._stack = ExitStack()
        self._ray = None
        self.started = False  # a local cluster of this compile's own, which cannot grow

    def __call__(self):
        """The `ray` module, connected, with Ray Data set to keep the order of its inputs."""
        if self._ray is None:
            import ray

            self.started = not ray.is_initialized() and not self.address and not os.environ.get("RAY_ADDRESS")
            # Ray's driver prints the cluster's messages about this job (a task retried after an actor
            # died, with its traceback) to sys.stdout, where `m3 compile --json` writes its output:
            # while the session is open, they go to stderr
            self._stack.enter_context(redirect_stdout(sys.stderr))
            self._ray = self._stack.enter_context(_ray_cluster(self.address))
            ctx = self._ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # the driver plans and writes in corpus order
            ctx.enable_progress_bars = False
            ctx.raise_original_map_exception = True  # an M3Error raised in an actor's call reaches _ray_error
        return self._ray

    def close(self) -> None:
        self._stack.close()
        self._ray = None


RAY_RESTARTS = 3  # restarts of a killed encoder actor, and retries of its calls, before the compile fails


def ray_frames(session: RaySession, model_path: Path, spec: MemorySpec, batches: Iterable[list[list[int]]],
               device: str, workers: int, gpus_per_worker: float, threads_per_worker: int) -> Iterator[Frames]:
    """The Ray engine's encoding: `workers` _Encoder actors, started once for the whole compile
    (each loads the model once); batch i goes to actor i mod workers, packed as int32, at most
    RAY_AHEAD calls per actor queued or running, and frames come back in batch order. `batches` is
    taken lazily, so the driver holds a few batches, not the plan. A killed actor is restarted
    (max_restarts, RAY_RESTARTS times) and the calls it held run again (max_task_retries); a frame
    depends only on its batch, so nothing in the kb changes."""
    items = enumerate(batches)
    first = next(items, None)
    if first is None:
        return  # nothing to encode: no actor (nor cluster) is started
    ray = session()
    if session.started:  # a cluster joined may be autoscaling: there Ray waits for the nodes
        _check_resources(ray, workers, threads_per_worker or 1, gpus_per_worker)
    fields, codebooks = _spec_for_workers(spec)
    # a killed actor is restarted and its calls run again, a few times: a batch that kills its actor
    # every time (out of memory, a segfault) or a node that never comes back ends the compile with one
    # error instead of restarting forever behind a silent driver
    encoder = ray.remote(num_cpus=threads_per_worker or 1, num_gpus=gpus_per_worker, max_restarts=RAY_RESTARTS,
                         max_task_retries=RAY_RESTARTS)(_Encoder)
    actors = [encoder.remote(str(model_path), fields, codebooks, device, threads_per_worker) for _ in range(workers)]

    def submit(item):
        i, batch = item
        return actors[i % workers].encode.remote(i, _pack_tokens(batch))

    def result(call):
        try:
            return ray.get(call)
        except ray.exceptions.RayError as e:
            raise _ray_error(ray, e, "the frames encoded so far are checkpointed, run the same command again "
                                     "to resume") from None

    try:
        for data in _in_order(first, items, submit, result, RAY_AHEAD * workers):
            yield _unpack_result(data)
    finally:  # also when the driver stops early: the actors and their queued calls go
        for actor in actors:
            ray.kill(actor)


def _check_resources(ray, workers: int, cpus: int, gpus: float) -> None:
    """M3Error now where this compile's local cluster cannot hold the actors asked for (Ray would
    wait forever for resources that never come)."""
    have = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each and have.get(name, 0) < workers * each:
            flag = "--cpus-per-worker" if name == "CPU" else "--gpus-per-worker"
            raise M3Error(f"--workers {workers} x {flag} {each:g} needs {workers * each:g} {name}s and the local "
                          f"Ray cluster has {have.get(name, 0):g}; lower them, or join a larger cluster with "
                          "--ray-address")


def _rows(ray, ds, n: int, resume: str) -> Iterator[dict]:
    """The n rows of a mapped Dataset, in order; a failure in Ray is one M3Error (_ray_error)."""
    rows = iter(ds.iter_rows())
    for k in range(n + 1):
        try:
            row = next(rows, None)
        except ray.exceptions.RayError as e:
            raise _ray_error(ray, e, resume) from None
        assert (row is None) == (k == n), (k, n)  # one row per input, then the end
        if row is not None:
            yield row


def _ray_error(ray, e: Exception, resume: str) -> M3Error:
    """An M3Error raised by an actor keeps its message, in a call (raise_original_map_exception) or
    while it starts (a checkpoint or tokenizers version of its own: Ray then has only the error's
    text); a rerun alone does not mend those. Anything else says how to resume."""
    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
    if isinstance(cause, M3Error):
        return M3Error(str(cause))
    raised = re.findall(r"M3Error: (.+)", str(e))
    if raised:
        return M3Error(raised[-1].strip())
    return M3Error(f"the Ray engine failed: {str(cause).strip().splitlines()[-1][:300]}; {resume}")


# ---- chunking on Ray -----------------------------------------------------------------------------------

def _pack_references(refs: list[Reference]) -> bytes:
    """A document's references as one binary cell: their count, (char_start, char_end, n_tokens)
    each, then the token ids, int64/int32 little-endian."""
    spans = np.array([(r.char_start, r.char_end, len(r.token_ids)) for r in refs], "<i8").reshape(-1, 3)  # (n, 3)
    ids = np.fromiter(chain.from_iterable(r.token_ids for r in refs), "<i4", int(spans[:, 2].sum()))  # (tokens,)
    return struct.pack("<q", len(refs)) + spans.tobytes() + ids.tobytes()


def _unpack_references(data: bytes, doc: Document) -> Iterator[Reference]:
    (n,) = struct.unpack_from("<q", data)
    spans = np.frombuffer(data, "<i8", 3 * n, 8).reshape(n, 3)  # (n, 3)
    ids = np.frombuffer(data, "<i4", offset=8 + 24 * n)  # (tokens,)
    at = 0
    for k, (start, end, length) in enumerate(spans.tolist()):
        yield Reference(doc.doc_id, doc.source, k, start, end, tuple(ids[at:at + length].tolist()), doc.text[start:end])
        at += length


class _Chunker:
    """A Ray Data actor that cuts documents as chunk_documents does, with the driver's tokenizer
    (its tokenizer.json text travels with the actor, so no node needs the checkpoint to cut) under
    the same `tokenizers` library: another version could cut the same text differently. It takes a
    block of documents a call, so chunk_documents batches their tokenizer calls, on at most
    `threads` of the tokenizer's threads (the CPUs Ray gave the actor, not every core of its node)."""

    def __init__(self, tokenizer_json: str, bos_id, eos_id, version: str, width: int, boundary: str,
                 min_fill: float, threads: int = 1, rule: int = CHUNK_RULE_VERSION):
        # read by the tokenizer's thread pool when it first runs, which is after this in a fresh actor
        os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
        import tokenizers

        from m3compile.tokenizer import Tokenizer

        if tokenizers.__version__ != version:
            raise M3Error(f"this Ray node has tokenizers {tokenizers.__version__} and the driver {version}, which "
                          "may cut references differently; install the same version on every node")
        if rule != CHUNK_RULE_VERSION:
            raise M3Error(f"this Ray node's m3compile cuts by chunk rule {CHUNK_RULE_VERSION} and the driver's by "
                          f"{rule}; install the same m3compile on every node")
        self.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), bos_id, eos_id)
        self.settings = (width, boundary, min_fill)

    def __call__(self, batch: dict) -> dict:
        js = [int(j) for j in batch["j"]]
        for j in js:
            _crash_once(f"ray-chunk:{j}")
        docs = [Document(str(j), "", str(text)) for j, text in zip(js, batch["text"])]
        refs: dict[str, list[Reference]] = {d.doc_id: [] for d in docs}
        for r in chunk_documents(docs, self.tokenizer, *self.settings):
            refs[r.doc_id].append(r)
        return {"j": np.array(js, np.int64), "refs": np.array([_pack_references(refs[d.doc_id]) for d in docs], object)}


def _document_windows(docs: Iterable[Document], chars: int) -> Iterator[list[Document]]:
    """Consecutive documents, a list per ~`chars` characters; a document of more is a list alone,
    which ray_references cuts in the driver."""
    window, n = [], 0
    for doc in docs:
        if len(doc.text) > chars and window:
            yield window
            window, n = [], 0
        window.append(doc)
        n += len(doc.text)
        if n >= chars:
            yield window
            window, n = [], 0
    if window:
        yield window


def ray_references(session: RaySession, docs: Iterable[Document], tokenizer, width: int, boundary: str,
                   min_fill: float, workers: int, threads_per_worker: int) -> Iterator[Reference]:
    """chunk_documents on Ray: the documents, taken a window of ~WINDOW_CHARS characters per actor at
    a time, are cut by `workers` _Chunker actors; references come back in corpus order, the ones
    chunk_documents gives (tests/test_distribute.py compares the kbs). A document longer than a
    window is cut here, in bounded memory, as chunk_documents cuts any document, and so is a window
    of less than half the characters (a small corpus, the changed documents between unchanged ones
    of an incremental compile, a corpus's last documents): starting actors would cost more."""
    import tokenizers

    limit = WINDOW_CHARS * workers
    chunker = None
    for window in _document_windows(docs, limit):
        chars = sum(len(d.text) for d in window)
        if chars < limit // 2 or len(window) == 1 and chars > limit:
            yield from chunk_documents(window, tokenizer, width, boundary, min_fill)
            continue
        ray = session()
        chunker = chunker or {"tokenizer_json": tokenizer.hf.to_str(), "bos_id": tokenizer.bos_id,
                              "eos_id": tokenizer.eos_id, "version": tokenizers.__version__, "width": width,
                              "boundary": boundary, "min_fill": min_fill, "threads": threads_per_worker or 1,
                              "rule": CHUNK_RULE_VERSION}
        blocks = min(len(window), 8 * workers)
        if session.started:  # as for the encoders (ray_frames): a pool Ray cannot place waits forever
            _check_resources(ray, min(workers, blocks), threads_per_worker or 1, 0)
        ds = ray.data.from_items([{"j": j, "text": d.text} for j, d in enumerate(window)], override_num_blocks=blocks)
        # a block a call (batch_size None): its documents' tokenizer calls are batched
        ds = ds.map_batches(_Chunker, batch_size=None, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=min(workers, blocks)),
                            num_cpus=threads_per_worker or 1, fn_constructor_kwargs=chunker)
        for j, row in enumerate(_rows(ray, ds, len(window), "nothing was written: run the same command again")):
            assert row["j"] == j, (row["j"], j)  # preserve_order
            yield from _unpack_references(row["refs"], window[j])
