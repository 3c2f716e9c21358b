"""`compile_kb` end to end: the kb's memories against transformers, determinism, standard readers,
real-activation quantization error, and what `inspect` reports."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from conftest import CHECKPOINT_CASES, make_checkpoint, memory_errors, reference_rule, tinystories
from m3compile.config import CompileConfig
from m3compile.kb import describe, open_kb, reference_detail
from m3compile.model import cpu_description
from m3compile.pipeline import compile_kb

pytest.importorskip("transformers", reason="transformers is the test-only parity oracle")


def word_corpus(root, n_docs=3, seed=0):
    """Documents of WordLevel words w3..w119, each a distinct shuffle (no repeated token in a window)."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    for d in range(n_docs):
        words = [f"w{i}" for i in rng.permutation(np.arange(3, 120))[: 40 + 25 * d]]
        (root / f"doc{d}.txt").write_text(" ".join(words))
    return root


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-head-dim", "qwen2-bias-tied", "llama3-rope"])
def test_kb_memories_equal_transformers(tmp_path, case):
    arch, overrides = CHECKPOINT_CASES[case]
    model_dir = tmp_path / "model"
    ref = make_checkpoint(model_dir, arch, overrides)
    ref.config._attn_implementation = "eager"
    corpus = word_corpus(tmp_path / "corpus")
    cfg = CompileConfig(corpus=str(corpus), model=str(model_dir), max_tokens=32, boundary="fixed",
                        prefix="w7 w9", top_k=6, memory_layers=(0, 2), quant="none", dtype="float32")
    manifest = compile_kb(cfg, tmp_path / "kb").manifest
    kb = open_kb(tmp_path / "kb")
    assert manifest.write["prefix_ids"] == [1, 7, 9]
    rows = kb.references().to_pylist()
    assert [r["n_tokens"] for r in rows] == [32, 8, 32, 32, 1, 32, 32, 26]  # docs of 40, 65, 90 words
    for row in rows:
        mem = kb.memory(row["ref_id"])
        assert mem.layers == (0, 2)
        expect = reference_rule(ref, [1, 7, 9], row["token_ids"], [0, 2], 6)
        for li, (kept, keys, values) in enumerate(expect):
            assert mem.positions[li].tolist() == kept.tolist()
            assert (mem.keys[li] - keys).abs().max() <= 1e-5
            assert (mem.values[li] - values).abs().max() <= 1e-5


def test_two_compiles_are_byte_identical(tmp_path):
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus", n_docs=4)
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, max_shard_bytes=3000)
    compile_kb(cfg, tmp_path / "a")
    compile_kb(cfg, tmp_path / "b")
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert sum(n.startswith("memory-0") for n in names) > 1  # several shards
    for name in names:
        if name != "run.json":  # timings and host live there, outside every checksum
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["cpu"] == cpu_description() and run["cpu"].strip()  # bf16 memories depend on the CPU
    stages = run["stage_seconds"]  # exclusive: the index, built while the generation is written, counts once
    assert {"encode+select", "write", "index"} <= set(stages) and min(stages.values()) >= 0
    assert sum(stages.values()) <= run["wall_seconds"] + 0.01, stages


def test_default_batches_hold_a_token_budget_and_give_the_bytes_of_any_batch_size(tmp_path, monkeypatch):
    """By default a batch holds as many references as fit in BATCH_TOKENS tokens (the forward packs
    them into one row block); --batch-size fixes the count instead. Either way the kb's bytes are
    the same, and run.json says which batching ran."""
    import m3compile.pipeline as pipeline
    monkeypatch.setattr(pipeline, "BATCH_TOKENS", 40)  # a few 16-token references a batch
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus", n_docs=4)
    batches = []
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16)
    compile_kb(cfg, tmp_path / "a", progress=lambda e: batches.append(e) if e.get("event") == "batch" else None)
    assert len(batches) > 3 and all(b["tokens"] <= 40 or b["refs"] == 1 for b in batches), batches
    assert any(b["refs"] > 2 for b in batches)  # short references share a batch beyond 40 // 16
    compile_kb(replace(cfg, batch_size=3), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file() and p.name != "run.json")
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_file() and p.name != "run.json")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run_a, run_b = (json.loads((tmp_path / k / "run.json").read_text()) for k in "ab")
    assert (run_a["batch_size"], run_a["batch_tokens"]) == (None, 40)
    assert run_b["batch_size"] == 3 and "batch_tokens" not in run_b


@pytest.mark.parametrize("units", [True, False])
def test_bf16_on_a_cpu_without_bf16_units_runs_its_products_in_float32(tmp_path, monkeypatch, units):
    # torch emulates bf16 matmuls there (~9x slower than float32 on an AVX2 CPU), so the compile's
    # products run in float32 and round to bf16 (model.linear): a bf16 kb at float32's speed, no
    # note to switch dtype. With bf16 units torch's bf16 products run
    import torch.nn.functional as F
    import m3compile.model as model
    monkeypatch.setattr(model, "CPU_BF16_UNITS", units)
    seen = set()
    real = F.linear

    def spy(x, w, b=None):
        if x.numel() >= model.UPCAST_MIN_ROWS * x.shape[-1]:  # shorter ones (the write prefix) keep torch's path
            seen.add(x.dtype)
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    import m3compile.sparsify as sparsify
    products = []  # attention's and the selection's bf16 products go through model.matmul
    for where in (model, sparsify):
        monkeypatch.setattr(where, "matmul", lambda a, b, real=model.matmul, where=where:
                            products.append((where.__name__, a.dtype)) or real(a, b))
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus", n_docs=1)
    notes = []
    m = compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16,
                                 dtype="bfloat16"), tmp_path / "kb", log=notes.append).manifest
    assert m.spec.dtype == "bfloat16" and m.counts["references"] > 0
    assert seen == ({torch.bfloat16} if units else {torch.float32}), seen
    assert set(products) == {("m3compile.model", torch.bfloat16), ("m3compile.sparsify", torch.bfloat16)}, products
    assert not any("bf16" in n for n in notes), notes


@pytest.mark.parametrize("dtype, workers, cpus, noted", [("bfloat16", 2, 1, True), ("bfloat16", 2, 2, False),
                                                        ("bfloat16", 1, 1, False), ("float32", 2, 1, False)])
def test_bf16_workers_on_other_thread_counts_are_named(tmp_path, monkeypatch, dtype, workers, cpus, noted):
    # bf16 memories depend on the thread count on a CPU with AMX (README, "Compiling on a cluster"):
    # workers that encode on other counts than a local compile are named once the compile knows it
    # will encode, before any encoding
    import torch

    import m3compile.pipeline as pipeline
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    notes = []
    pipeline._note_encoding(CompileConfig(corpus=str(tmp_path), dtype=dtype, workers=workers, cpus_per_worker=cpus),
                            notes.append)
    assert any("--cpus-per-worker 2 gives a local compile's" in n for n in notes) is noted, notes


@pytest.mark.parametrize("spill", [False, True])
def test_plan_columns_give_back_the_rows(tmp_path, spill, monkeypatch):
    # a compile's plan holds its rows as fixed records and variable records (issue 16), in memory or
    # spilled to anonymous files, with only a few blocks of fixed records held (here blocks of 4
    # rows, 2 held, so that reads, locates and appends cross blocks written back); what comes
    # back is the table's rows
    from array import array

    from m3compile import references
    from m3compile.references import SCHEMA, RefColumns, Rows, columns, iter_columns
    monkeypatch.setattr(RefColumns, "BLOCK_ROWS", 4)
    monkeypatch.setattr(RefColumns, "CACHE_BLOCKS", 2)
    monkeypatch.setattr(references, "COLUMN_BLOCK", 5)
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus", n_docs=3)
    (corpus / "doc9.txt").write_text("w5 été w6 😀 w7")  # multi-byte text
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, max_shard_bytes=3000),
               tmp_path / "kb")
    rows = open_kb(tmp_path / "kb").references().to_pylist()
    for r in rows:
        r["token_ids"] = array("i", r["token_ids"])
    assert len({r["shard"] for r in rows}) > 1 and len({r["doc_id"] for r in rows}) == 4
    (tmp_path / "spill").mkdir()
    store = RefColumns(tmp_path / "spill" if spill else None)
    for r in reversed(rows):
        store.append(r)
        assert store.row(len(store) - 1) == r  # read back at once: nothing waits in a write buffer
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file has no name to leave behind
    view = Rows(store, array("q", range(len(rows) - 1, -1, -1)))
    assert view == rows and [list(store.row(0))] == [SCHEMA.names]
    assert view[2:5] == rows[2:5] and list(view[-2:]) == rows[-2:]
    got = columns(view, SCHEMA.names)
    assert {n: list(v) for n, v in got.items()} == {n: [r[n] for r in rows] for n in SCHEMA.names}
    # numbers come back as arrays (8 bytes a row, not a list of objects)
    assert all(isinstance(got[n], np.ndarray) for n in (*RefColumns.INTS, *RefColumns.FLOATS))
    # a new row has no frame until it is written; locate fills it, nothing else moves
    fresh = {k: v for k, v in rows[0].items() if k not in RefColumns.LOCATION}
    j = store.append(fresh)
    assert store.row(j)["shard"] == "" and store.row(j)["byte_length"] == 0
    Rows(store, array("q", [j])).locate(0, **{k: rows[0][k] for k in RefColumns.LOCATION})
    assert store.row(j) == rows[0] and view == rows
    assert columns(Rows(store, [j, 3, 1]), ("text", "token_ids")) == {  # out of order: one read each
        k: [store.row(p)[k] for p in (j, 3, 1)] for k in ("text", "token_ids")}
    for at in ([0, 1, 2, 5, 6], [0, 2, 3, 7], [1, 1, 2], [1, 1, 3], [2, 2, 2, 5], [6, 5, 4, 9, 8]):  # runs as slices
        got = columns(Rows(store, at), ("ref_id", "text", "shard"))
        assert {k: list(v) for k, v in got.items()} == {k: [store.row(p)[k] for p in at] for k in got}
    blocks = list(iter_columns(view, ("ref_id", "shard")))
    assert [len(b["shard"]) for b in blocks] == [5] * (len(rows) // 5) + ([len(rows) % 5] if len(rows) % 5 else [])
    assert np.concatenate([b["ref_id"] for b in blocks]).tolist() == [r["ref_id"] for r in rows]
    assert [k.tobytes().hex() for k in view.keys()] == [r["ref_key"] for r in rows]
    # appended in descending ref id order: a plan that needs sorting
    assert not store.ascending and len(rows) > 3 * RefColumns.BLOCK_ROWS
    ascending = RefColumns(None)
    for r in rows:
        ascending.append(r)
    assert ascending.ascending and Rows(ascending, range(len(rows))) == rows
    # rows at once: a table's (an incremental compile reads its kb so), and copies of another
    # store's rows with some columns replaced and frames taken from other rows (documents given
    # back); each must store what appending the rows' dicts one by one stores
    import pyarrow as pa
    table = pa.Table.from_pylist([{**r, "token_ids": list(r["token_ids"])} for r in rows], SCHEMA)
    bulk = RefColumns(tmp_path / "spill" if spill else None)
    assert bulk.extend_from_table(table.slice(0, 5)) == range(0, 5)
    assert bulk.extend_from_table(table.slice(5)) == range(5, len(rows))  # a slice: offsets into its arrays
    assert bulk.ascending and Rows(bulk, range(len(rows))) == Rows(ascending, range(len(rows))) == rows
    # the columnar comparison of two stores sees a change in any column
    for name, value in [("text", rows[3]["text"] + "x"), ("shard", "other"), ("byte_offset", 7), ("ref_key", "0" * 64),
                        ("token_ids", array("i", [9] * rows[3]["n_tokens"]))]:
        other = RefColumns(None)
        for i, r in enumerate(rows):
            other.append({**r, name: value} if i == 3 else r)
        assert Rows(other, range(len(rows))) != Rows(bulk, range(len(rows))), name
        other.close()
    src = [7, 2, 9, 3, 3]  # rows copied, in this order
    frames = [7, -1, 1, -1, 3]  # the memory each takes: its own, none (a new row), another row's
    want, new_id = [], 1000
    for p, f in zip(src, frames):
        meta = {k: v for k, v in rows[p].items() if k not in RefColumns.FRAME}
        frame = {k: rows[f][k] for k in RefColumns.FRAME} if f >= 0 else {
            "ref_id": new_id, "shard": "", "byte_offset": 0, "byte_length": 0, "quant_rel_err": 0.0, "quant_max_err": 0.0}
        new_id += f < 0
        want.append({**frame, **meta, "doc_id": "moved" if len(want) < 2 else "other", "n_kept": 2})
    copied = RefColumns(None)
    for r in want:
        copied.append(r)
    records = bulk.records(src)
    got = bulk.extend_from(bulk, records, bulk.variable(records), frames=frames, new_id=1000, doc_id=(["moved", "other"], [2, 3]), n_kept=2)
    assert got == range(len(rows), len(rows) + 5)
    assert Rows(bulk, got) == Rows(copied, range(5)) == want
    assert Rows(bulk, range(len(rows))) == rows  # the copied rows are untouched
    # references.parquet written from the records, a row group at a time, is the file the dicts give
    monkeypatch.setattr(references, "ROW_GROUP_SIZE", 6)
    references.write_references(tmp_path / "dicts.parquet", rows + want)
    references.write_references(tmp_path / "records.parquet", Rows(bulk, [*range(len(rows)), *got]))
    assert (tmp_path / "dicts.parquet").read_bytes() == (tmp_path / "records.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "records.parquet").metadata.num_row_groups == -(-(len(rows) + 5) // 6)
    store.close()
    bulk.close()
    # a table whose columns are of other types is refused as damaged, not read through its buffers
    from m3compile.errors import M3Error
    meta = references._schema_with_metadata().metadata
    for name, kind in (("token_ids", pa.list_(pa.int64())), ("text", pa.large_string())):
        schema = pa.schema([pa.field(f.name, kind if f.name == name else f.type) for f in SCHEMA], metadata=meta)
        pq.write_table(pa.Table.from_pylist(table.to_pylist(), schema), tmp_path / "other.parquet")
        with pytest.raises(M3Error, match="damaged"):
            references.read_reference_rows(tmp_path / "other.parquet")


def test_files_open_with_their_standard_libraries(tmp_path):
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus")
    manifest = compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=20), tmp_path / "kb").manifest
    kb = tmp_path / "kb"
    assert json.loads((kb / "manifest.json").read_text()) == manifest.to_dict()
    paths = manifest.paths
    index = json.loads((kb / paths["shard_index"]).read_text())
    assert index["metadata"]["shard_dir"] == ".."  # shards sit in the kb directory, beside the generation
    table = pq.read_table(kb / paths["references"])
    assert table.num_rows == manifest.counts["references"]
    meta = json.loads(pq.read_metadata(kb / paths["references"]).metadata[b"m3compile"])
    assert meta == {"format": "m3-references", "format_version": 1}
    # a table whose version is missing, not an integer or newer is refused by name (formats/references.md)
    from m3compile.errors import M3Error
    from m3compile.references import check_metadata

    for version, message in ((None, "is not an integer"), ("1", "is not an integer"), (0, "is not an integer"),
                             (True, "is not an integer"), (2, "newer than this m3compile reads")):
        info = {"format": "m3-references", **({} if version is None else {"format_version": version})}
        pq.write_table(table.replace_schema_metadata({"m3compile": json.dumps(info)}), tmp_path / "r.parquet")
        with pytest.raises(M3Error, match=message):
            check_metadata(tmp_path / "r.parquet")
    n_refs = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(kb / shard), framework="numpy") as f:
            md = f.metadata()
            assert md["format"] == "m3-kv" and md["quant"] == manifest.quant["scheme"] and md["rope"] == "post"
            p = "shard." + shard[len("memory-"):len("memory-") + 5]
            offsets, ids = f.get_tensor(p + ".kv_offsets"), f.get_tensor(p + ".ref_ids")
            assert offsets[-1] == f.get_tensor(p + ".kv").shape[0]
            n_refs += len(ids)
    assert n_refs == table.num_rows
    for name, entry in manifest.files.items():
        assert (kb / name).stat().st_size == entry["bytes"]


@pytest.mark.slow
def test_int8_int4_errors_on_real_activations(stories260k, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "stories.txt").write_text("\n\n".join(tinystories(40)))
    results = {}
    for quant in ("none", "int8", "int4"):
        cfg = CompileConfig(corpus=str(corpus), model=str(stories260k), quant=quant)
        m = compile_kb(cfg, tmp_path / quant).manifest
        results[quant] = m
        info = describe(open_kb(tmp_path / quant))
        on_disk = sum((tmp_path / quant / name).stat().st_size for name in m.files)
        listed = {p.relative_to(tmp_path / quant).as_posix() for p in (tmp_path / quant).rglob("*") if p.is_file()}
        assert listed - set(m.files) == {"manifest.json", "run.json"}
        assert info["sizes"]["on_disk_bytes"] == on_disk
    q8, q4 = results["int8"].quant, results["int4"].quant
    assert results["none"].quant["rel_err_max"] == 0.0
    # measured on this model: int8 ~0.4 % worst relative error, int4 ~7 %; bounds leave headroom
    assert 0 < q8["rel_err_max"] < 0.01 and q8["rel_err_mean"] < 0.006
    assert 0 < q4["rel_err_max"] < 0.12 and q4["rel_err_mean"] < 0.09
    assert q8["bits_per_element_stored"] < 0.5 * results["none"].quant["bits_per_element_stored"]
    # at head dim 8 the per-group scale/min and the positions weigh a lot: int4-asym-g8 is 9.1 bits
    assert q4["bits_per_element_stored"] < 0.85 * q8["bits_per_element_stored"]
    # each reference's recorded errors are what its dequantized memory gives against the lossless kb's,
    # keys and values together, computed here (verify's --recompute tolerance is the recorded max)
    exact = open_kb(tmp_path / "none")
    for quant in ("int8", "int4"):
        approx = open_kb(tmp_path / quant)
        rows = approx.references().select(["ref_id", "quant_rel_err", "quant_max_err"]).to_pylist()
        assert len(rows) == results[quant].counts["references"] > 7
        for row in rows:
            rel, mx = memory_errors(exact, approx, row["ref_id"])
            assert row["quant_rel_err"] == pytest.approx(rel, rel=1e-4), row
            assert row["quant_max_err"] == pytest.approx(mx, rel=1e-4, abs=1e-7), row
        q = results[quant].quant
        assert q["rel_err_max"] == pytest.approx(max(r["quant_rel_err"] for r in rows), rel=1e-6)
        assert q["max_abs_err"] == pytest.approx(max(r["quant_max_err"] for r in rows), rel=1e-6)


def test_reference_detail_names_kept_tokens(tmp_path):
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus", n_docs=1)
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), top_k=4, max_tokens=16), tmp_path / "kb")
    d = reference_detail(open_kb(tmp_path / "kb"), 0)
    words = d["text"].split()
    for layer, heads in d["kept"].items():
        assert len(heads) == 2 and all(len(h) == 4 for h in heads)
        for head in heads:
            assert [x["text"] for x in head] == [words[x["j"]] for x in head]
    # the rows of given references, in the order asked, an unknown id left out: those of the table
    kb = open_kb(tmp_path / "kb")
    table = kb.references().to_pylist()
    ids = [r["ref_id"] for r in table]
    assert len(ids) > 2
    want = [ids[-1], 10**9, ids[0], ids[1]]
    assert kb.reference_rows(want) == [table[-1], table[0], table[1]]
    assert kb.reference_rows(want, ["text"]) == [{"ref_id": r["ref_id"], "text": r["text"]} for r in (table[-1], table[0], table[1])]
    from m3compile.errors import M3Error
    from m3compile.references import read_references

    with pytest.raises(M3Error, match="no column nope; the file is damaged"):  # not silently left out
        read_references(kb.references_path, ["ref_id", "nope"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_content_key_context_is_the_documented_json(dtype):
    """formats/manifest.md, "Content keys": C = sha256 of the canonical JSON of the model identity,
    prefix ids, top-k, memory layers, quant, dtype, pad_to and payload, plus "bf16_recipe": 2 for a
    bf16 kb (its selection logits and softmax are bf16 since 0.2.0). float32 keys are those of
    every earlier version (the golden kb's shards hold them); bf16 keys are not."""
    import hashlib

    from m3compile.spec import MemorySpec

    spec = MemorySpec(model_config_sha256="c" * 64, model_weights_sha256=(("model.safetensors", "w" * 64),),
                      tokenizer_sha256="t" * 64, n_layers=4, n_kv_heads=2, head_dim=16, width=32, boundary="sentence",
                      min_fill=0.5, chunk_rule_version=1, prefix="p", prefix_ids=(1, 7), memory_layers=(1, 3),
                      top_k=8, quant="int8-sym-g16", dtype=dtype)
    doc = {"model": {"config_sha256": "c" * 64, "weights_sha256": {"model.safetensors": "w" * 64},
                     "tokenizer_sha256": "t" * 64},
           "prefix_ids": [1, 7], "top_k": 8, "memory_layers": [1, 3], "quant": "int8-sym-g16", "dtype": dtype,
           "pad_to": 32, "payload": "m3-kv/1"}
    if dtype == "bfloat16":
        doc["bf16_recipe"] = 2
    assert spec.key_context() == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()


def test_reference_table_is_the_one_pyarrow_converts():
    # references.parquet's row groups are built from buffers (pa.array() of Python values imports
    # pandas where installed); pyarrow's own conversion of the same rows is the oracle
    import pyarrow as pa

    from m3compile.references import _schema_with_metadata, _table

    def row(i, text, ids):
        return {"ref_id": i, "doc_id": f"d{i} é", "source": "a/b.txt", "index": i, "char_start": 3 * i,
                "char_end": 3 * i + len(text), "n_tokens": len(ids), "token_ids": ids, "text": text, "n_kept": min(3, len(ids)),
                "shard": "memory-00001.safetensors", "byte_offset": 1 << 33, "byte_length": 77, "quant_rel_err": 0.25 * i,
                "quant_max_err": 2.0**-10, "ref_key": "ab" * 32, "doc_sha256": "cd" * 32}

    rows = [row(0, "Été 😀 “quoted”", [5, 6, 2**31 - 1]), row(1, "", []), row(2, "x" * 300, list(range(40)))]
    schema = _schema_with_metadata()
    built = _table(rows, schema)
    assert built.equals(pa.Table.from_pylist(rows, schema=schema)) and built.schema.equals(schema, check_metadata=True)
    assert _table(rows[1:2], schema).to_pylist() == rows[1:2]


def test_a_stage_timed_inside_another_counts_once(monkeypatch):
    """run.json's stage_seconds are exclusive: the index is built while a generation is written,
    and its seconds were counted in `write` as well, so the stages summed to more than the run.
    A clock that moves only when told: no timing, so a loaded machine cannot fail it."""
    from m3compile import pipeline

    now = [100.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: now[0])
    timer = pipeline.Timer()
    with timer("write"):
        now[0] += 1.0
        with timer("index"):
            now[0] += 20.0
        now[0] += 0.5
    with timer("index"):  # accumulated across batches
        now[0] += 2.0
    assert dict(timer.seconds) == {"write": 1.5, "index": 22.0}


def test_the_weights_load_once_there_is_work_and_must_be_the_ones_fingerprinted(tmp_path, monkeypatch):
    """A compile fingerprints the model's files at once but loads the weights only when the kb is
    not up to date (pipeline._Checkpoint): a vq compile loads them before it cuts its codebook
    sample, a model whose files were written in between is refused with one error and the kb stays
    as it was, and --device is checked for its spelling before any of it."""
    import os

    import m3compile.pipeline as pipeline
    from m3compile.errors import M3Error

    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    corpus = word_corpus(tmp_path / "corpus")
    cfg = CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4)
    with pytest.raises(M3Error, match="--device 'gpu' is not a device"):
        replace(cfg, device="gpu")
    train = pipeline._train_codebooks
    seen = []

    def train_after_the_load(out, setup, timer, log):
        seen.append("model" in setup.ck.__dict__)  # the cached_property has run
        return train(out, setup, timer, log)

    monkeypatch.setattr(pipeline, "_train_codebooks", train_after_the_load)
    compile_kb(replace(cfg, quant="vq-pq4"), tmp_path / "vq")  # 16 centroids: a small corpus trains them
    assert seen == [True]

    kb = tmp_path / "kb"
    compile_kb(cfg, kb)
    before = {p.name: p.read_bytes() for p in kb.rglob("*") if p.is_file()}
    (corpus / "doc0.txt").write_text("w5 w6 w7 w8 w9 w10 w11 w12 w13")  # a change: the weights load
    previous = pipeline._previous

    def weights_saved_meanwhile(*a, **k):
        prev = previous(*a, **k)
        weights = tmp_path / "model" / "model.safetensors"
        st = weights.stat()
        weights.write_bytes(weights.read_bytes())  # the same bytes, saved again
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime on any file system
        return prev

    monkeypatch.setattr(pipeline, "_previous", weights_saved_meanwhile)
    with pytest.raises(M3Error, match="model's files in .* changed while this compile ran"):
        compile_kb(cfg, kb)
    assert {p.name: p.read_bytes() for p in kb.rglob("*") if p.is_file()} == before


def test_an_empty_write_prefix_without_bos_is_refused(tmp_path):
    # a BOS-less tokenizer (Qwen2's) with --prefix "": nothing would come before a text when it is
    # read, so m3 eval's first logits row was the text's own last one (an empty slice, a traceback)
    # and m3 train's targets were shifted; the compile refuses it, and a prefix text or a BOS is fine
    from m3compile.errors import M3Error

    make_checkpoint(tmp_path / "model", "Qwen2ForCausalLM", {})
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    cfg.pop("bos_token_id", None)
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    corpus = word_corpus(tmp_path / "corpus")
    base = dict(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4)
    with pytest.raises(M3Error, match="--prefix '' with a tokenizer that has no BOS"):
        compile_kb(CompileConfig(**base, prefix=""), tmp_path / "kb")
    assert not (tmp_path / "kb" / "manifest.json").exists()
    r = compile_kb(CompileConfig(**base, prefix="w5"), tmp_path / "kb")
    assert r.manifest.write["prefix_ids"] == [5]  # no BOS: the prefix text alone
