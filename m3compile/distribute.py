"""Where the map step of a compile runs: the encode batches of a plan become frames, in order.

A compile's map step is `encode_frames`: memorize a batch of references (forward, select) and
quantize + compress each memory into a frame (pack.encode_payload). Everything else (reading,
cutting, planning, writing shards, the generation, the manifest) stays in the driver, pipeline.py.

  local   the batches are encoded one after another in this process (`local_frames`), or, with
          `--workers N`, by N worker processes on this machine, one model and --cpus-per-worker
          torch threads each, results in batch order (`pool_frames`): torch splits a small model's
          matmuls poorly across threads, and processes do not share them. The bytes are the same
          (tests/test_local_workers.py). Not the default: each worker holds a copy of the model,
          and spawned workers import the caller's __main__, which a script without an
          `if __name__ == "__main__":` guard would run again. At most POOL_AHEAD batches per
          worker are queued at once, so the driver holds a bounded share of the plan (issue 16).
  ray     (`m3 compile --engine ray`, the `[ray]` extra) the batches are a Ray Dataset, encoded by
          a pool of actors, one model per actor, with GPUs per actor when asked (`ray_frames`).
          Results stream back to the driver in batch order (DataContext preserve_order), so the
          driver writes exactly what the local engine writes: the same batches through the same
          `encode_frames` give the same frames (tests/test_distribute.py compares the kb bytes).
          The driver hands Ray the plan a window at a time (about WINDOW_TOKENS token ids per actor,
          packed as int32), one Dataset per window, so its memory does not grow with the corpus
          (issue 16); each window's actors load the model again, a few seconds against minutes of
          encoding. A worker killed mid-job is restarted and its block of batches is run again by Ray Data
          (its actor pools' default max_restarts / max_task_retries); a frame depends only on its
          batch, so nothing in the result changes. A driver killed
          mid-job resumes like the local engine: frames checkpointed to .spill/ or in written
          shards are copied, not sent to the workers again.

The actors need the model at the same path (a shared filesystem on a real cluster); each checks
the weights' sha256 against the spec before encoding, so a different checkpoint at that path on
some node is an error, not a silently mixed kb.
"""

import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import struct
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from m3compile.errors import M3Error
from m3compile.pack import encode_payloads
from m3compile.spec import MemorySpec, memorize

MAX_BATCHES_PER_BLOCK = 64  # encode batches per Ray Data block (one actor call)
# encode batches queued or encoding per worker process (pool_frames): every worker has its next batch
# waiting while the driver writes, and the driver holds 2 x workers batches, not the whole plan
POOL_AHEAD = 2
# token ids per actor in one Ray window (ray_frames): 8 MB of int32 each; with the embedded model
# 2 actors take ~2 minutes over a window, against a few seconds to start the next window's actors
WINDOW_TOKENS = 1 << 21
CONNECT_TIMEOUT_S = 10  # a --ray-address that accepts no TCP connection in this time is an error
Frames = list[tuple[bytes, float, float, int]]  # (frame, relative error, max abs error, K) per reference


def encode_frames(model, spec: MemorySpec, token_lists: Sequence[Sequence[int]],
                  timer: Callable[[str], object] | None = None) -> Frames:
    """(frame, relative error, max abs error, K) of each reference: memorize, then quantize+pack.

    Errors are rounded to float32, as the references table and the shards store them, so a frame
    copied later reports the same figures."""
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


def _pool_start(model_path: str, fields: dict, codebooks: tuple | None, device: str, threads: int) -> None:
    global _pool_encoder
    _pool_encoder = _Encoder(model_path, fields, codebooks, device, threads)


def _pool_encode(item: tuple[int, list[list[int]]]) -> bytes:
    i, tokens = item
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
                               initargs=(str(model_path), fields, codebooks, device, threads_per_worker))
    try:
        ahead = chain([first], islice(items, POOL_AHEAD * workers - 1))
        pending = deque(pool.submit(_pool_encode, item) for item in ahead)
        while pending:
            data = pending.popleft().result()
            pending.extend(pool.submit(_pool_encode, item) for item in islice(items, 1))  # before the driver writes
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


def _windows(batches: Iterable[Sequence[Sequence[int]]], tokens: int) -> Iterator[list[tuple[int, bytes]]]:
    """(batch number, _pack_tokens) of consecutive batches, a list per ~`tokens` token ids (at
    least one batch each); batch numbers count on across windows."""
    window, n = [], 0
    for i, batch in enumerate(batches):
        window.append((i, _pack_tokens(batch)))
        n += sum(map(len, batch))
        if n >= tokens:
            yield window
            window, n = [], 0
    if window:
        yield window


def _unpack_result(data: bytes) -> Frames:
    cut = data.index(b"\n")
    out, at = [], cut + 1
    for n, rel, mx, k in json.loads(data[:cut]):
        out.append((data[at:at + n], rel, mx, k))
        at += n
    return out


def _crash_once(name: str) -> None:
    """Test hook: M3_CRASH_AT=<name> SIGKILLs this worker the first time it gets here (the file
    M3_CRASH_MARK records that it did), as a node failure would; its retry then runs normally."""
    mark = os.environ.get("M3_CRASH_MARK")
    if os.environ.get("M3_CRASH_AT") == name and mark and not os.path.exists(mark):
        Path(mark).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def _spec_for_workers(spec: MemorySpec) -> tuple[dict, tuple | None]:
    """What a worker process or actor rebuilds `spec` from (_Encoder): its fields, and its
    codebooks as tensors (None without VQ)."""
    codebooks = spec.codebooks.to_tensors() if spec.codebooks is not None else None
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__ if k != "codebooks"}, codebooks


class _Encoder:
    """A Ray Data actor, or the model of a local worker process (pool_frames): loads the model once,
    checks it is the spec's, encodes batch rows."""

    def __init__(self, model_path: str, spec_fields: dict, codebooks: tuple | None, device: str, threads: int):
        import torch

        from m3compile.model import fingerprint, load_checkpoint

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

    def __call__(self, row: dict) -> dict:
        _crash_once(f"ray-batch:{row['i']}")
        frames = encode_frames(self.model, self.spec, _unpack_tokens(row["tokens"]))
        return {"i": row["i"], "frames": _pack_result(frames)}


def check_ray(address: str | None) -> None:
    """M3Error now, before any corpus is read, if Ray is not installed or `address` takes no TCP
    connection (ray.init would retry an unreachable cluster for minutes)."""
    try:
        import ray
    except ImportError:
        raise M3Error("--engine ray needs Ray: pip install 'm3compile[ray]'") from None
    if ray.is_initialized() or not address or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise M3Error(f"cannot connect to Ray at {address} ({getattr(e, 'strerror', None) or e}); start a "
                      "cluster with `ray start --head` and pass the address it prints (host:6379) to "
                      "--ray-address") from None


@contextmanager
def _ray_cluster(address: str | None):
    check_ray(address)
    import ray
    import ray.data  # its import configures the "ray.data" logger (DEBUG, INFO to the console) ...

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # ... whose per-dataset INFO lines are not the user's
    # nor is its notice that the progress bars we turn off (the CLI shows its own) are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    started = not ray.is_initialized()
    if started:
        try:
            # no address: a local cluster on this machine (or RAY_ADDRESS's, as `ray` itself reads it)
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a new local cluster"
            raise M3Error(f"cannot connect to Ray at {where}: {str(e).splitlines()[0][:200]}; start one with "
                          "`ray start --head` and pass its address to --ray-address") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def ray_frames(model_path: Path, spec: MemorySpec, batches: Iterable[list[list[int]]], device: str,
               address: str | None, workers: int, gpus_per_worker: float, threads_per_worker: int) -> Iterator[Frames]:
    """The Ray engine: `batches` encoded by `workers` actors; frames yielded in batch order. The
    batches are taken lazily, a window of ~WINDOW_TOKENS token ids per actor at a time (_windows)."""
    windows = _windows(batches, WINDOW_TOKENS * workers)
    window = next(windows, None)
    if window is None:
        return  # nothing to encode: no cluster is started
    fields, codebooks = _spec_for_workers(spec)
    with _ray_cluster(address) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the driver writes frames in plan order
        ctx.enable_progress_bars = False
        encoder = {"model_path": str(model_path), "spec_fields": fields, "codebooks": codebooks, "device": device,
                   "threads": threads_per_worker}
        while window is not None:
            yield from _ray_window(ray, window, encoder, workers, gpus_per_worker, threads_per_worker)
            window = next(windows, None)


def _ray_window(ray, window: list[tuple[int, bytes]], encoder: dict, workers: int, gpus_per_worker: float,
                threads_per_worker: int) -> Iterator[Frames]:
    """One window's batches as a Ray Dataset mapped by a pool of `workers` _Encoder actors."""
    # a block is one actor call: enough blocks to keep every actor busy and stream results back,
    # at most MAX_BATCHES_PER_BLOCK batches in each so that a lost worker loses little
    blocks = min(len(window), max(8 * workers, math.ceil(len(window) / MAX_BATCHES_PER_BLOCK)))
    ds = ray.data.from_items([{"i": i, "tokens": tokens} for i, tokens in window], override_num_blocks=blocks)
    # Ray Data's actor pools restart a killed actor and run its block again (their default)
    ds = ds.map(_Encoder, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads_per_worker or 1,
                num_gpus=gpus_per_worker, fn_constructor_kwargs=encoder)
    rows = iter(ds.iter_rows())
    for want, _ in window:
        try:
            row = next(rows)
        except ray.exceptions.RayError as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            if isinstance(cause, M3Error):
                raise M3Error(str(cause)) from None
            raise M3Error(f"the Ray engine failed: {str(cause).strip().splitlines()[-1][:300]}; the frames "
                          "encoded so far are checkpointed, run the same command again to resume") from None
        assert row["i"] == want, (row["i"], want)  # preserve_order
        yield _unpack_result(row["frames"])
    assert next(rows, None) is None  # the dataset's iterator ends before the next window or the cluster goes
