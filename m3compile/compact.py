"""`m3 compact`: rewrite the shards that hold tombstoned frames, keeping only live ones.

Live frames are copied byte for byte into new shards numbered after the existing ones (no model,
no re-encoding); the references table and shard index move to a new generation; the other
generation files (retrieval indexes, tokenizer) are carried over unchanged since the set of live
references does not change. Committed by the manifest like a compile, whose garbage collection
follows. Except after a killed compile: it leaves its encoded frames in `.spill/` and in shards
no manifest names, which its resume copies instead of encoding again. While `.spill/` is there,
compact removes only what it replaced (the shards it rewrote, the old generation) and numbers its
shards past every shard on disk; the commit of the compile run again collects the rest.
"""

import json
import shutil
from pathlib import Path
from typing import Callable

from m3compile import manifest as mf, references as refs_file, store
from m3compile.errors import M3Error
from m3compile.pack import INDEX_NAME, ShardReaders, ShardWriter, read_shard_header, shard_info, write_shard_index


def compact_kb(kb_dir: str | Path, log: Callable[[str], None] = lambda s: None) -> dict:
    """Drop tombstoned frames from a kb.

    Returns:
        {"shards_rewritten", "refs_moved", "bytes_freed"}: bytes_freed is what the kb's shard files
        hold less on disk (the rewritten shards' sizes less the new shards'), headers included.
    Example:
        >>> compact_kb("kb/")["bytes_freed"]
    """
    kb = Path(kb_dir)
    mf.read_manifest(kb)  # a clear error before any lock is taken in a directory that is no kb
    with store.KbLock(kb, log):
        store.remove_temporaries(kb)
        manifest = mf.read_manifest(kb)
        checked: dict = {}  # the files hashed here, whose sha256 the new manifest takes while they are unchanged
        damaged = store.damaged_files(kb, manifest.files, checked)
        if damaged:
            name, why = next(iter(damaged.items()))
            # a repair rebuilds shards and indexes from the kb's frames; lost codebooks only a new compile
            fix = ("train new ones: `m3 compile CORPUS -o KB --rebuild --retrain-codebooks`"
                   if name.startswith("codebooks-") else f"run `m3 verify --repair {kb}` first")
            raise M3Error(f"{kb}: {name}: {why}; compacting would copy damage: {fix}")
        dirty = sorted(s for s, v in manifest.shards.items() if v["refs"] > v["live_refs"])
        if not dirty:
            return {"shards_rewritten": [], "refs_moved": 0, "bytes_freed": 0}
        # the rows as the plan holds them (fixed records, token ids and texts spilled to an anonymous
        # file in the kb), a block at a time: not a dict a row, which for 10^8 references is ~100 GB
        rows = refs_file.read_reference_rows(kb / manifest.paths["references"], spill_dir=kb)
        try:
            return _compact(kb, manifest, dirty, rows, checked)
        finally:
            rows.store.close()


def _compact(kb: Path, manifest: mf.Manifest, dirty: list[str], rows: "refs_file.Rows", checked: dict) -> dict:
    old_gen = kb / manifest.generation
    first = 1 + max(store.shard_numbers_on_disk(kb) | {store.shard_number(s) for s in manifest.shards})
    meta = dict(read_shard_header(kb / dirty[0])["__metadata__"])
    moved, live, dirty_set = 0, set(), set(dirty)
    names = ("ref_id", "shard", "byte_offset", "byte_length", "ref_key", "quant_rel_err", "quant_max_err")
    with ShardWriter(kb, meta, manifest.config["max_shard_bytes"], first_index=first) as writer, \
            ShardReaders(kb) as frames:
        size = refs_file.COLUMN_BLOCK
        for block, c in enumerate(refs_file.iter_columns(rows, names, size)):  # in ref id order, as a writer needs
            lo = block * size
            for j, (ref_id, shard) in enumerate(zip(c["ref_id"].tolist(), c["shard"])):
                if shard not in dirty_set:
                    live.add(shard)
                    continue
                frame = frames.read(shard, int(c["byte_offset"][j]), int(c["byte_length"][j]), ref_id)
                loc = writer.add(ref_id, frame, bytes.fromhex(c["ref_key"][j]),
                                 (float(c["quant_rel_err"][j]), float(c["quant_max_err"][j])))
                rows.locate(lo + j, shard=loc.shard, byte_offset=loc.byte_offset, byte_length=loc.byte_length)
                live.add(loc.shard)
                moved += 1
    live = sorted(live)

    def build(gen: Path):
        refs_file.write_references(gen / refs_file.FILE_NAME, rows)
        index_meta = {k: str(v) for k, v in _index_metadata(old_gen).items()}
        write_shard_index(gen, [shard_info(kb / s) for s in live], index_meta)
        # the generation's files as the manifest lists them (formats/README.md: never by listing the
        # directory; a stray file there, checked by no one, was copied and then listed as the kb's)
        prefix = manifest.generation + "/"
        for name in manifest.files:
            rel = name[len(prefix):]
            if name.startswith(prefix) and rel not in (refs_file.FILE_NAME, INDEX_NAME):
                (gen / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(old_gen / rel, gen / rel)

    gen = store.write_generation(kb, build)
    shards = store.shard_state(kb, rows)
    # the shard files' bytes before and after (not only the dead frames': a shard's header and its
    # frames' index go with it, and a new shard has its own)
    freed = (sum((kb / s).stat().st_size for s in dirty)
             - sum((kb / s).stat().st_size for s in shards if s not in manifest.shards))
    unfinished = (kb / store.SPILL_DIR).exists()  # a compile killed before its commit: its work stays
    mf.commit(kb, manifest.with_generation(kb, gen, shards, checked), collect=not unfinished)
    if unfinished:
        for name in dirty:  # what this compact replaced
            if name not in shards:
                (kb / name).unlink(missing_ok=True)
        if old_gen.name != gen:
            shutil.rmtree(old_gen, ignore_errors=True)
    return {"shards_rewritten": dirty, "refs_moved": moved, "bytes_freed": freed}


def _index_metadata(gen: Path) -> dict:
    meta = json.loads((gen / INDEX_NAME).read_text())["metadata"]
    return {k: v for k, v in meta.items() if k not in ("total_size", "n_shards", "n_refs", "index_always_written")}
