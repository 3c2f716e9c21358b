"""The public API (m3compile's top level) refuses wrong types and values with one M3Error, as
the CLI does, instead of a TypeError from deep inside, or a kb nothing can read."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from m3compile import CompileConfig, compile_kb, generate_text, open_kb, verify_kb
from m3compile.config import TrainConfig
from m3compile.errors import M3Error
from m3compile.model import load_checkpoint
from m3compile.retrieve import Retriever
from m3compile.spec import memorize


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("Brerrdale was founded by Emrys Viandane. It lies on the river Ost. "
                                           "Its market is held on Saturday, and it sells wool to other towns.")
    compile_kb(CompileConfig(corpus=str(root / "corpus")), root / "kb")
    return open_kb(root / "kb")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(top_k=True), "top_k=True (bool, option --top-k) must be an integer"),  # wrote a kb whose manifest said `true`
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_k="8"), "top_k='8'"),
    (dict(max_tokens=20.5), "max_tokens=20.5"),
    (dict(memory_layers="0-3"), "parse_layers('0-3')"),
    (dict(memory_layers=3), "memory_layers=3"),
    (dict(quant=8), "quant=8"),
    (dict(prefix=5), "prefix=5"),
    (dict(checkpoint_seconds=math.nan), "finite"),
    (dict(max_shard_bytes=0), "--max-shard-bytes 0"),
])
def test_compile_config_refuses_wrong_types(kwargs, fragment):
    with pytest.raises(M3Error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        CompileConfig(corpus="c", **kwargs)
    with pytest.raises(M3Error):
        CompileConfig.from_dict({"corpus": "c", **kwargs})


def test_compile_config_takes_paths_and_any_sequence_of_layers():
    c = CompileConfig(corpus=Path("docs"), model=Path("ckpt"), memory_layers=(x for x in (3, 1)))
    assert (c.corpus, c.model, c.memory_layers) == ("docs", "ckpt", (1, 3))
    assert CompileConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, names", [(dict(log_every=0), "log_every 0 must"),
                                           (dict(checkpoint_every=-1), "checkpoint_every -1 0"),
                                           (dict(threads=0), "threads 0 at least"),
                                           (dict(decay_fraction=2.0), "decay_fraction 2.0 must"),
                                           # AdamW takes an infinite rate and writes NaN weights
                                           (dict(lr=math.inf), "--lr inf must"),
                                           (dict(min_lr=math.inf), "min_lr inf 0 or more"),
                                           (dict(grad_clip=math.inf), "grad_clip inf above 0"),
                                           (dict(lr=math.nan), "--lr nan must"),
                                           # torch's generator takes no larger seed (a traceback mid-run)
                                           (dict(seed=2**70), f"--seed {2**70} must be"), (dict(seed=-1), "--seed -1")])
def test_train_config_refuses_what_would_fail_mid_run(kwargs, names):
    # the message names the value refused, not only some setting
    with pytest.raises(M3Error, match=re.escape(names)):
        TrainConfig(model="m", kb="kb", texts="t", out="o", **kwargs)


def test_reading_refuses_wrong_ids_queries_and_counts(kb):
    with pytest.raises(M3Error, match="ref ids 0..") as e:
        kb.memory(10**6)
    assert "references" in str(e.value)
    for bad in (1.7, "3", True, np.bool_(False)):  # True read reference 1's memory
        with pytest.raises(M3Error, match="a ref id is an integer"):
            kb.memory(bad)
    assert kb.memory(np.int64(0)).keys.shape == kb.memory(0).keys.shape
    r = Retriever.open(kb.path, kb.manifest.to_dict())
    with pytest.raises(M3Error, match="list of query strings"):
        r.retrieve_many("Brerrdale", k=2)  # not nine one-letter queries
    with pytest.raises(M3Error, match="a query is a string"):
        kb.retrieve(None, k=2)
    for k in ("3", True, 0):
        with pytest.raises(M3Error, match="references asked for"):
            kb.retrieve("Brerrdale", k=k)
    assert len(kb.retrieve("Brerrdale", k=np.int64(1))) == 1
    for kw, fragment in ((dict(max_new_tokens=-1), "--max-new-tokens -1"), (dict(temperature=-1.0), "--temperature"),
                         # TypeError tracebacks before
                         (dict(max_new_tokens="10"), "max_new_tokens='10' \\(str\\) must be an integer"),
                         (dict(temperature="0.5"), "temperature='0.5' \\(str\\) must be a number"),
                         (dict(kb=None, mode="dense"), "no --kb is given")):
        with pytest.raises(M3Error, match=fragment):
            generate_text("Who founded Brerrdale?", **{"kb": kb.path, **kw})
    with pytest.raises(M3Error, match="--recompute '20' must be a whole number"):
        verify_kb(kb.path, recompute="20")
    for bad in (123, None):
        with pytest.raises(M3Error, match="is not a path"):
            open_kb(bad)


def test_a_few_rows_come_from_their_row_groups(tmp_path, monkeypatch):
    """kb.reference_rows of a few ids reads only the row groups whose ref_id statistics hold them
    (references.read_rows_by_id; `m3 query` and `m3 inspect --ref` of SciFact read 2 of 37 groups):
    the rows, in the order asked, of the whole table; frames are found by the location arrays."""
    import random

    import pyarrow.parquet as pq

    from m3compile import references as refs_file
    monkeypatch.setattr(refs_file, "ROW_GROUP_SIZE", 3)
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(" ".join(f"Town {i} sells wool number {j}." for j in range(12)))
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus")), tmp_path / "kb")
    base = open_kb(tmp_path / "kb")
    assert pq.ParquetFile(base.references_path).metadata.num_row_groups > 4
    whole = {r["ref_id"]: r for r in base.references().to_pylist()}
    rng = random.Random(0)
    for _ in range(20):
        ids = rng.sample(sorted(whole), 3) + [10**9, -1]  # the last two are no reference: left out
        fresh = open_kb(tmp_path / "kb")
        assert fresh.reference_rows(ids) == [whole[i] for i in ids[:3]]
        assert fresh._table is None  # the whole table was not read
        assert fresh.reference_rows(ids, ["text"]) == [{"ref_id": i, "text": whole[i]["text"]} for i in ids[:3]]
    assert len(base) == len(whole) and base.memory(max(whole)).keys.shape[2] == whole[max(whole)]["n_kept"]


def test_memorize_refuses_empty_references_and_foreign_ids(kb):
    ck = load_checkpoint(Path(__import__("m3compile").__file__).parent / "embedded" / "reader")
    with pytest.raises(M3Error, match="no tokens"):
        memorize(ck.model, [[5, 6], []], kb.spec)
    with pytest.raises(M3Error, match="outside the model's vocabulary"):
        memorize(ck.model, [[5, ck.args.vocab_size]], kb.spec)
    # a model of another shape than the spec's: memories of the wrong model, refused before encoding
    from dataclasses import replace
    with pytest.raises(M3Error, match=r"the model \(4 layers, 2 kv heads x 32\) is not the one"):
        memorize(ck.model, [[5, 6]], replace(kb.spec, n_kv_heads=4))
    with pytest.raises(M3Error, match="dtype 'junk'"):
        load_checkpoint(Path(__import__("m3compile").__file__).parent / "embedded" / "reader", dtype="junk")
