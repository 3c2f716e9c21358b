"""manifest.json: the entry point and commit point of a knowledge base (formats/manifest.md).

Written last and atomically (temp file, fsync, rename, fsync of the directory), so a directory
without a manifest is by definition incomplete. Its content is deterministic: JSON with sorted
keys, no timestamps or timings; those go to run.json beside it, which no checksum covers.
"""

import json
import os
from pathlib import Path

from m3compile.errors import M3Error
from m3compile.model import sha256_file

FORMAT, FORMAT_VERSION = "m3-kb", 1
FILE_NAME = "manifest.json"
RUN_LOG = "run.json"


def file_entry(kb_dir: Path, name: str) -> dict:
    p = Path(kb_dir) / name
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def atomic_write_text(path: Path, text: str, before_replace=None) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def to_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_manifest(kb_dir: Path, manifest: dict, before_replace=None) -> Path:
    assert manifest.get("format") == FORMAT, manifest.get("format")
    path = Path(kb_dir) / FILE_NAME
    atomic_write_text(path, to_json(manifest), before_replace)
    return path


def read_manifest(kb_dir: Path) -> dict:
    path = Path(kb_dir) / FILE_NAME
    if not Path(kb_dir).is_dir():
        raise M3Error(f"{kb_dir} is not a directory; give a knowledge base made by `m3 compile`")
    if not path.is_file():
        raise M3Error(f"no {FILE_NAME} in {kb_dir}: not a knowledge base, or its compile did not "
                      "finish; run `m3 compile` into it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise M3Error(f"cannot parse {path}: {e}; the manifest is damaged: recompile the kb") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise M3Error(f"{path} is not an m3compile kb manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise M3Error(f"{path} has format_version {version}, newer than this m3compile reads "
                      f"({FORMAT_VERSION}); upgrade m3compile")
    return manifest
