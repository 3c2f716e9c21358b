"""The kb directory as a store: content keys, the compile lock, frames already on disk, the
generation directory and garbage collection (formats/manifest.md, "Incremental compiles").

A reference's memory is identified by a content key (MemorySpec.ref_key: sha256 of everything
that decides its bytes and its token ids). Every shard stores the key of each frame, so a frame on
disk is found again by key whether its shard is live, holds tombstones, or was left by a compile
that was killed: nothing durably written is encoded twice. A frame is reused only after its bytes
pass pack.check_frame, and a file of the kb is trusted only while its sha256 is the manifest's
(`damaged_files`): what fails is rebuilt, never copied.

Shards are append-only. Everything else that changes from one compile to the next (the
references table, the shard index, the retrieval indexes, the tokenizer copy) lives in one
content-addressed directory `gen-<hash>/`, written whole before the manifest names it. The
manifest is the commit point; files it does not name are garbage that the next compile removes.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import safe_open

from m3compile.errors import M3Error
from m3compile.pack import ShardReaders, ShardWriter, check_frame, read_shard_header, shard_info
from m3compile.references import iter_columns
from m3compile.spec import MemorySpec

LOCK_NAME = ".m3.lock"
SPILL_DIR = ".spill"  # frames encoded but not yet in a shard, made durable (Checkpoints)
NO_SHARD_LIMIT = 1 << 62  # a spill, or a repaired shard, is written whole as one file
GEN_PREFIX = "gen-"
_TMP_GEN = ".gen-tmp"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in 1 MB pieces (a model's files, every kb file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Frame:
    shard: str  # shard file name
    offset: int  # byte offset in the shard's kv tensor
    length: int
    rel_err: float
    max_err: float


def shard_number(name: str) -> int | None:
    if name.startswith("memory-") and name.endswith(".safetensors") and name[7:12].isdigit() and len(name) == 24:
        return int(name[7:12])
    return None


def shard_numbers_on_disk(kb_dir: Path) -> set[int]:
    """The numbers of every shard file in the kb directory, named by its manifest or not (a killed
    compile's), and of the shards moved aside (FrameSource.move_aside)."""
    found = set()
    for p in Path(kb_dir).iterdir():
        name = p.name[len(_ORPHAN):] if p.name.startswith(_ORPHAN) else p.name
        n = shard_number(name)
        if n is not None:
            found.add(n)
    return found


def shard_frames(path: Path) -> list[tuple[int, bytes, "Frame"]]:
    """(ref id, content key, Frame) of every frame of one shard, from its index tensors, in order.

    Raises whatever safetensors raises on a damaged file; callers decide what damage means.
    """
    ids, keys, offsets, lengths, errs = _shard_index(path)
    return [(i, k, Frame(path.name, o, n, float(e[0]), float(e[1])))
            for i, k, o, n, e in zip(ids.tolist(), keys.tolist(), offsets.tolist(), lengths.tolist(), errs)]


def _shard_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One shard's index tensors as arrays: ref ids (n,), content keys (n,) 32-byte void, frame
    offsets (n,), lengths (n,) and errors (n, 2) float32. Raises what safetensors raises on a
    damaged file."""
    n = shard_number(path.name)
    assert n is not None, path
    p = f"shard.{n:05d}"
    with safe_open(str(path), framework="numpy") as f:
        offsets, ids, keys, errs = (f.get_tensor(f"{p}.{t}") for t in ("kv_offsets", "ref_ids", "ref_keys", "ref_errs"))
    assert len(offsets) == len(ids) + 1 == len(keys) + 1 == len(errs) + 1, "shard index tensors disagree"
    assert keys.shape[1:] == (32,) and errs.shape[1:] == (2,), "shard index tensors have other shapes"
    keys = np.ascontiguousarray(keys, dtype=np.uint8).view("V32")[:, 0]
    return (ids.astype(np.int64), keys, offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64),
            errs.astype(np.float32))


class FrameIndex:
    """Frames by content key, in ~60 bytes a frame: the keys sorted in one array of 32-byte
    values beside each frame's shard (a code), offset, length and errors. A dict of Frame objects
    took ~300 bytes a frame (issue 16: a resumed or incremental compile of a 100 MB corpus holds
    ~2 M). Among frames of one key, the first given wins."""

    def __init__(self, shards: list[str], parts: list[tuple]):
        # parts: per shard, (its index in `shards`, (keys, offsets, lengths, errs) as _shard_index gives them)
        self.shards = shards
        if not parts:
            parts = [(0, (np.empty(0, "V32"), np.empty(0, np.int64), np.empty(0, np.int64),
                          np.empty((0, 2), np.float32)))]
        keys = np.concatenate([k for _, (k, *_) in parts])
        order = np.argsort(keys, kind="stable")  # by key, then in the order given
        self.keys = keys[order]
        self.shard = np.concatenate([np.full(len(k), i, np.int32) for i, (k, *_) in parts])[order]
        self.offset, self.length, self.errs = (np.concatenate([part[j] for _, part in parts])[order]
                                               for j in (1, 2, 3))

    def __len__(self) -> int:
        return len(self.keys)

    def _find(self, key: bytes) -> int | None:
        i = int(np.searchsorted(self.keys, np.frombuffer(key, "V32")[0]))
        return i if i < len(self.keys) and self.keys[i].tobytes() == key else None

    def __contains__(self, key: bytes) -> bool:
        return self._find(key) is not None

    def get(self, key: bytes) -> "Frame | None":
        i = self._find(key)
        if i is None:
            return None
        return Frame(self.shards[self.shard[i]], int(self.offset[i]), int(self.length[i]), float(self.errs[i, 0]),
                     float(self.errs[i, 1]))


def scan_frames(kb_dir: Path) -> FrameIndex:
    """Every frame in every readable shard file of the directory (shards in name order, then the
    checkpoint spills), by content key: the first found for a key.

    Unreadable shards (truncated, foreign) are skipped: they are garbage, and the frames they
    held are encoded again. A frame found here is still checked before use (pack.check_frame).
    """
    names, parts = [], []
    spills = sorted((Path(kb_dir) / SPILL_DIR).glob("memory-*.safetensors"))
    for path in sorted(Path(kb_dir).glob("memory-*.safetensors")) + spills:
        if shard_number(path.name) is None:
            continue
        try:
            index = _shard_index(path)
        except Exception:  # any damage: the shard's index is not trusted as a source of frames
            continue
        parts.append((len(names), index[1:]))
        names.append(f"{SPILL_DIR}/{path.name}" if path.parent.name == SPILL_DIR else path.name)
    return FrameIndex(names, parts)


def damaged_files(kb_dir: Path, files: dict, checked: dict | None = None) -> dict[str, str]:
    """Files of a manifest's `files` that are missing or differ from their recorded size or sha256,
    with what is wrong; {} when every file holds. `checked`, given, receives each file that holds:
    name -> (its file_stamp taken before it was hashed, its sha256), which manifest.file_entry
    takes instead of hashing the file again while the stamp is unchanged."""
    out = {}
    for name, entry in sorted(files.items()):
        p = Path(kb_dir) / name
        if not p.is_file():
            out[name] = "missing"
            continue
        st = p.stat()
        if st.st_size != entry["bytes"]:
            out[name] = f"{st.st_size} bytes, the manifest says {entry['bytes']} (truncated or changed)"
        elif sha256_file(p) != entry["sha256"]:
            out[name] = "sha256 differs from the manifest (the file was changed or damaged)"
        elif checked is not None:
            checked[name] = (file_stamp(st), entry["sha256"])
    return out


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What says a file was not written since: size, modification and change times (ns), inode and
    device. A write changes the times, even with its mtime set back (no user call sets a ctime), and
    a rename or a copy the inode; damage underneath the file system (a flipped bit on disk) changes
    none, so `m3 verify` always hashes. A kb's files are trusted to their stamps within one compile,
    a model's weight digests across runs (checkpoint.sha256_weights)."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns


class KbLock:
    """An exclusive lock on a kb directory for one compile, compact or repair: `.m3.lock`, holding
    the holder's pid and host.

    Where the file system supports flock(2) (Linux and macOS file systems, NFS through its lock
    manager) the lock is the kernel's lock on that file: released when the process ends, however it
    ends, so a lock file left by a killed compile is simply taken again, and two compiles that find
    it at once cannot both take it (a pid check that removes a dead holder's file races there: both
    remove it, both create one). The holder unlinks the file while it still holds the lock, so a
    process that opened the old file and locks it afterwards sees that the path is no longer that
    file and tries again. Elsewhere (no fcntl, or flock refused) the file is created exclusively,
    and one left by a process that is gone from this host is removed first."""

    def __init__(self, kb_dir: Path, log: Callable[[str], None] = lambda s: None):
        self.path = Path(kb_dir) / LOCK_NAME
        self.log = log
        self._fd: int | None = None

    def __enter__(self):
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(8):
            try:
                try:
                    fd, created = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
                except FileExistsError:
                    fd, created = os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:  # removed between the two opens
                continue
            except OSError as e:
                raise M3Error(f"cannot create the lock {self.path}: {e.strerror or e}; choose a writable kb "
                              "directory") from None
            try:
                _flock(fd)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder())
            except OSError:  # no flock here: the exclusive-create lock, which this open may have taken
                if created:
                    os.write(fd, me.encode())
                    os.close(fd)
                    return self
                os.close(fd)
                return self._create_exclusive(me)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # its holder finished and unlinked it after we opened it: a new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            self._fd = fd
            return self
        raise M3Error(f"cannot take the lock {self.path}; another process keeps replacing it")

    def _create_exclusive(self, me: str):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    self.log(f"removing stale lock {self.path} of pid {holder.get('pid')}, which is gone")
                    self.path.unlink(missing_ok=True)
                    continue
                self._refuse(holder)
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return self
        raise M3Error(f"cannot take the lock {self.path}; delete it if no compile is running")

    def _refuse(self, holder: dict):
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder.get("pid") is not None
               else "another process (its lock names none yet)")
        raise M3Error(f"{self.path.parent} is being compiled by {who} (lock {self.path}); wait for it to finish, "
                      "or delete the lock file if that process is gone") from None

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        if self._fd is not None:  # released after the unlink: see the class docstring
            os.close(self._fd)
            self._fd = None


def _flock(fd: int) -> None:
    """flock(2) LOCK_EX | LOCK_NB on fd: BlockingIOError when another process holds it, another
    OSError where the file system or platform has none."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        raise OSError("no fcntl") from None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_generation(kb_dir: Path, build: Callable[[Path], None]) -> str:
    """Build the mutable artefacts into a fresh directory and file it under its content hash.

    Returns the generation name `gen-<16 hex>`. An identical generation already present is kept
    as it is (a no-change rebuild rewrites nothing); one of that name whose files no longer hash
    to it (damaged) is replaced.
    """
    kb_dir = Path(kb_dir)
    tmp = kb_dir / _TMP_GEN
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        build(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        name = _generation_hash(tmp)
        final = kb_dir / name
        if final.exists() and _generation_hash(final) == name:
            shutil.rmtree(tmp)
        else:
            if final.exists():  # same name, damaged content: the fresh build replaces it
                shutil.rmtree(final)
            for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
                _fsync(d)
            os.replace(tmp, final)
            _fsync(kb_dir)
        return name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _generation_hash(gen: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in gen.rglob("*") if q.is_file()):
        h.update(p.relative_to(gen).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(p)))
    return GEN_PREFIX + h.hexdigest()[:16]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def collect_garbage(kb_dir: Path, named: set[str]) -> list[str]:
    """Remove every entry of the kb directory that a compile writes (is_kb_entry) and the manifest
    does not name (top level). Anything else (a README beside the shards, a `.git`) is not the
    kb's to remove: `m3 compact`, which takes any kb as it is, and a compile into a directory holding
    dot-files both leave it alone."""
    removed = []
    for p in sorted(Path(kb_dir).iterdir()):
        if p.name in named or p.name in ("manifest.json", "run.json", LOCK_NAME) or not is_kb_entry(p.name):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p.name)
    return removed


def shard_state(kb_dir: Path, rows: list[dict]) -> dict:
    """The manifest's state.shards: per shard holding a live reference, its frames and bytes, live and all."""
    live = defaultdict(lambda: [0, 0])
    for cols in iter_columns(rows, ("shard", "byte_length")):
        for shard, length in zip(cols["shard"], cols["byte_length"]):
            live[shard][0] += 1
            live[shard][1] += int(length)
    state = {}
    for name in sorted(live):
        info = shard_info(Path(kb_dir) / name)
        kv = next(t for t in info.tensors if t.endswith(".kv"))
        state[name] = {"refs": info.n_refs, "live_refs": live[name][0],
                       "kv_bytes": read_shard_header(Path(kb_dir) / name)[kv]["shape"][0],
                       "live_kv_bytes": live[name][1]}
    return state


def remove_temporaries(kb_dir: Path) -> None:
    """Temp files of an interrupted compile (never named by a manifest, never a source of frames):
    hidden `.tmp` files (every temp name a compile gives starts with a dot) and `.gen-tmp`."""
    for p in Path(kb_dir).iterdir():
        if _is_temporary(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _is_temporary(name: str) -> bool:
    return (name.startswith(".") and name.endswith(".tmp")) or name == _TMP_GEN


_GENERATION = re.compile(re.escape(GEN_PREFIX) + "[0-9a-f]{16}")
_ORPHAN = ".orphan-"  # prefix of a shard moved aside (FrameSource)


def is_kb_entry(name: str) -> bool:
    """Names a compile writes at the top of a kb: shards, generations, codebooks, manifest, run log,
    lock, spills, temp files and shards moved aside. Only these are ever removed from a kb."""
    return (shard_number(name) is not None or _GENERATION.fullmatch(name) is not None
            or (name.startswith("codebooks-") and name.endswith(".safetensors"))
            or name in ("manifest.json", "run.json", LOCK_NAME, SPILL_DIR) or _is_temporary(name)
            or (name.startswith(_ORPHAN) and shard_number(name[len(_ORPHAN):]) is not None))


# ---- frames for a compile: those on disk, and checkpoints of new ones ----------------------------------

class FrameSource:
    """Frames already on disk, by content key, each checked before use; follows an orphan shard
    moved aside before reuse of its name."""

    def __init__(self, out: Path, spec: MemorySpec):
        self.out, self.spec = out, spec
        self.frames = scan_frames(out)
        self.alias: dict[str, str] = {}
        self._readers = ShardReaders(out)  # each shard's header read once, however many frames are copied
        self._max = spec.max_payload()

    def get(self, key: bytes) -> tuple[bytes, Frame, int] | None:
        """(frame bytes, where it was, K) of a frame with this key that checks, or None."""
        f = self.frames.get(key)
        if f is None:
            return None
        try:
            data = self._readers.read(self.alias.get(f.shard, f.shard), f.offset, f.length)
            K = check_frame(data, self.spec.scheme, self._max, f.shard)[2]
        except M3Error:
            # damaged bytes are never copied: the reference is encoded again
            return None
        return data, f, K

    def move_aside(self, name: str) -> None:
        # an orphan shard (named by no manifest) whose name a new shard takes: keep its frames reachable
        aside = f"{_ORPHAN}{name}"
        self._readers.forget(name)
        os.replace(self.out / name, self.out / aside)
        self.alias[name] = aside

    def close(self) -> None:
        self._readers.close()


class Checkpoints:
    """Makes encoded frames durable before their shard fills (a shard holds up to max_shard_bytes,
    hours of encoding for a small model): the frames added that are not yet in a written shard go,
    as they come, into an open spill of `.spill/` (shard format; its frame bytes wait in a
    temporary file, not in memory), which is closed every `seconds`. A resumed compile finds them
    by content key like any frame on disk, so a kill loses at most `seconds` of encoding and the
    result keeps the bytes of an uninterrupted compile. Spills are dropped as soon as a shard
    holding their frames is written, and with every commit."""

    def __init__(self, out: Path, metadata: dict, seconds: float):
        self.dir, self.metadata, self.seconds = out / SPILL_DIR, metadata, seconds
        self.spill: ShardWriter | None = None  # the open spill: frames added since the last checkpoint
        self.newest: tuple | None = None  # the last frame added: (ref_id, frame, key, err)
        self.last = time.monotonic()
        self.n = 1 + max((shard_number(p.name) or 0 for p in self.dir.glob("memory-*.safetensors")), default=0)
        self.first = self.n  # spills of an earlier, killed run stay: their frames may not be copied yet

    def added(self, ref_id: int, frame: bytes, key: bytes, err: tuple[float, float]) -> None:
        if self.spill is None:
            self.dir.mkdir(exist_ok=True)
            self.spill = ShardWriter(self.dir, self.metadata, NO_SHARD_LIMIT, first_index=self.n)
        self.spill.add(ref_id, frame, key, err)
        self.newest = (ref_id, frame, key, err)

    def shard_written(self) -> None:
        # every frame added so far is in a written shard, or is the one that opened the next shard
        self.discard()
        if self.newest is not None:
            self.added(*self.newest)
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if self.first <= (shard_number(p.name) or 0) < self.n:
                    p.unlink()

    def tick(self) -> None:
        if self.spill is None or time.monotonic() - self.last < self.seconds:
            return
        self.spill.close()
        self.spill, self.n, self.last = None, self.n + 1, time.monotonic()

    def discard(self) -> None:
        """Drop the open spill (its frames are in a written shard, or the compile stops)."""
        if self.spill is not None:
            self.spill.abort()
            self.spill = None
