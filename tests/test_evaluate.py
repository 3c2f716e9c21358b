"""Memories read by a real trained model that was never trained to read them (stories260K)."""

import json

import pytest

from conftest import tinystories
from m3compile.config import CompileConfig
from m3compile.corpus import CorpusReport, iter_documents
from m3compile.evaluate import evaluate, oracle_refs, _RefInfo
from m3compile.kb import load_kb_model, open_kb
from m3compile.lm import token_nll
from m3compile.pipeline import compile_kb


def test_oracle_refs_nearest_the_chunk():
    refs = [_RefInfo(10 + i, i, 100 * i, [0] * 100) for i in range(8)]
    assert oracle_refs(refs, 0, 3) == [10, 11, 12]
    assert oracle_refs(refs, 450, 3) == [13, 14, 15]
    assert oracle_refs(refs, 799, 2) == [16, 17]
    assert oracle_refs(refs[:2], 50, 5) == [10, 11]


@pytest.mark.slow
def test_full_memory_helps_a_real_model(stories260k, tmp_path):
    corpus = tmp_path / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": s}) + "\n" for i, s in enumerate(tinystories(20))))
    compile_kb(CompileConfig(corpus=str(corpus), model=str(stories260k)), tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    ck = load_kb_model(kb)
    docs = list(iter_documents(corpus, CorpusReport()))
    r = evaluate(kb, ck, docs, oracle=True, max_text_tokens=255)
    rows = r["rows"]
    assert len({v["tokens"] for v in rows.values()}) == 1  # the same predicted tokens in every row
    # the read layout (write prefix, separator BOS at p+128) costs the plain model nothing
    plain, n = token_nll(ck.model, [[ck.tokenizer.bos_id] + ck.tokenizer.encode(d.text)[:255] for d in docs])
    assert n == rows["no_memory"]["tokens"]
    assert abs(rows["no_memory"]["nll"] - plain / n) < 0.005
    # every token of the text's own references in every layer clearly helps (measured -0.027 nats);
    # the sparse memories must not hurt (measured -0.0002: nearly inert for a model never trained to
    # read them; a better reader may lower it, which this bound allows)
    assert rows["full_all_layers"]["nll"] < rows["no_memory"]["nll"] - 0.015
    assert r["improved_docs"]["full_all_layers"] >= 17
    assert rows["sparse"]["nll"] < rows["no_memory"]["nll"] + 0.01
    # and each memory row reads memories: a row that read none (or the same as another) would pass the
    # bounds above; the sparse row is the kb's own memories, read as m3 generate reads them
    nlls = [rows[k]["nll"] for k in ("no_memory", "sparse", "full_memory_layers", "full_all_layers")]
    assert len({round(x, 9) for x in nlls}) == 4, nlls
    from m3compile.evaluate import _doc_refs
    from m3compile.reader import ChunkMemory, ReadLayout, text_nll

    layout = ReadLayout.from_manifest(kb.manifest, ck.tokenizer.bos_id)
    by_doc, _ = _doc_refs(kb)
    total = count = 0
    for d in docs:
        ids = ck.tokenizer.encode(d.text)[:255]
        mems = [ChunkMemory.gather(kb.memories(oracle_refs(by_doc[d.doc_id], s, layout.refs_per_chunk)),
                                   layout.memory_layers) for s in range(0, len(ids), layout.chunk_tokens)]
        nll, n = text_nll(ck.model, layout, ids, mems)
        total, count = total + nll, count + n
    assert count == rows["sparse"]["tokens"] and total / count == pytest.approx(rows["sparse"]["nll"], rel=1e-6)


def test_a_text_past_the_models_positions_is_scored_up_to_them(tmp_path):
    # `m3 eval` ran a text longer than the model's positions through one forward at RoPE positions
    # it never trained on (and a scores matrix growing with its square); it scores the first
    # position_limit tokens now, and says how many texts it cut
    import math

    from conftest import model_and_corpus

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    corpus = model_and_corpus(tmp_path, [400, 30])
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4), tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    ck = load_kb_model(kb)
    docs = list(iter_documents(corpus, CorpusReport()))
    r = evaluate(kb, ck, docs, oracle=True)
    room = r["position_limit"]
    assert 30 < room < 400 and r["texts_cut_at_position_limit"] == 1
    short = len(ck.tokenizer.encode(docs[1].text))
    assert r["rows"]["no_memory"]["tokens"] == room + short and all(math.isfinite(v["nll"]) for v in r["rows"].values())
    assert evaluate(kb, ck, docs, oracle=True, max_text_tokens=20)["texts_cut_at_position_limit"] == 0


def test_oracle_refuses_a_text_the_kb_lacks_before_scoring_any(tmp_path):
    # --oracle reads each text's own references: a text the kb does not hold was found only when
    # its turn came, after every text before it had been scored (minutes of work thrown away)
    from dataclasses import replace

    from conftest import model_and_corpus
    from m3compile.errors import M3Error

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    corpus = model_and_corpus(tmp_path, [30, 30])
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4), tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    docs = list(iter_documents(corpus, CorpusReport()))
    scored = []
    with pytest.raises(M3Error, match="document 'elsewhere.txt' is not in the kb"):
        evaluate(kb, load_kb_model(kb), docs + [replace(docs[0], doc_id="elsewhere.txt")], oracle=True,
                 progress=scored.append)
    assert scored == []


def test_a_kb_with_nothing_before_the_text_is_one_error(tmp_path):
    # a kb written before compiles refused an empty write prefix without BOS: its texts' first
    # token had no logits row (a ValueError traceback from cross_entropy)
    from dataclasses import replace

    from conftest import model_and_corpus
    from m3compile.errors import M3Error

    pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoint")
    corpus = model_and_corpus(tmp_path, [30])
    compile_kb(CompileConfig(corpus=str(corpus), model=str(tmp_path / "model"), max_tokens=16, top_k=4), tmp_path / "kb")
    kb = open_kb(tmp_path / "kb")
    kb.manifest.__dict__["spec"] = replace(kb.manifest.spec, prefix_ids=())  # as such a kb records it
    ck = load_kb_model(kb)
    ck.tokenizer.bos_id = None
    with pytest.raises(M3Error, match="no token comes before a text"):
        evaluate(kb, ck, list(iter_documents(corpus, CorpusReport())), oracle=True)
