"""m3compile.train: memory training reads memories exactly as the read side does, and resumes.

A tiny random Llama and a word-level corpus, compiled losslessly (quant none, float32) so the kb's
memories are the write side's exact floats; training memories and the training forward are held to
`m3 compile`'s memories and `reader.text_logits` at the same weights.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import SHARED_DATA, shared, write_word_tokenizer
from m3compile.config import CompileConfig, read_model_memory
from m3compile.errors import M3Error
from m3compile.kb import open_kb
from m3compile.model import (ModelArgs, Transformer, bf16_is_native, cpuinfo_has_bf16, load_checkpoint,
                             save_checkpoint)
from m3compile.pipeline import compile_kb
from m3compile.reader import ChunkMemory, ReadLayout, text_logits
from m3compile.train import (STATE_FILE, TrainConfig, batch_indices, batch_logits, encode_memories, kb_retriever,
                             lr_at, prepare_sequences, step_loss, train, uses_memory)

VOCAB = 120


def _doc(rng, n):
    return " ".join(f"w{3 + int(rng.integers(0, VOCAB - 3))}" for _ in range(n)) + "."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("train")
    args = ModelArgs(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)
    model = Transformer(args).init_weights(seed=0, std=0.1)
    save_checkpoint(model, root / "model", bos_id=1, eos_id=2)
    write_word_tokenizer(root / "model", VOCAB)
    rng = np.random.default_rng(0)
    docs = [_doc(rng, n) for n in (30, 12, 25, 18, 40, 9)]
    (root / "corpus").mkdir()
    for i, d in enumerate(docs):
        (root / "corpus" / f"d{i}.txt").write_text(d)
    compile_kb(CompileConfig(corpus=str(root / "corpus"), model=str(root / "model"), max_tokens=16, top_k=3,
                             quant="none", dtype="float32"), root / "kb")
    # training texts: shuffled pieces of the documents, plus one document verbatim (for the filter)
    texts = [{"id": f"t{i}", "text": " ".join(d.split()[::-1][: 8 + 3 * i])} for i, d in enumerate(docs)]
    texts.append({"id": "copy", "text": docs[1]})
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    return root


def _config(root, out, **kw):
    base = dict(model=str(root / "model"), kb=str(root / "kb"), texts=str(root / "texts.jsonl"), out=str(out),
                steps=6, batch_size=3, chunk_tokens=8, refs_per_chunk=2, lr=3e-3, warmup_steps=2, bf16=False,
                memory_fraction=0.6, log_every=1, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


def test_the_start_models_retrieval_floor_is_carried_and_training_reads_every_reference(setup, tmp_path,
                                                                                         monkeypatch):
    import shutil

    from m3compile.config import model_min_relative_score, write_model_memory
    from m3compile.retrieve import Retriever

    start = tmp_path / "start"
    shutil.copytree(setup / "model", start)
    settings = {"max_tokens": 16, "boundary": "sentence", "min_fill": 0.75, "prefix": "Reference:", "top_k": 3,
                "memory_layers": [0]}
    write_model_memory(start, settings, "test", min_relative_score=0.5)
    floors, retrieve_many = [], Retriever.retrieve_many

    def spy(self, texts, k, *args, **kwargs):
        floors.append(kwargs.get("min_relative_score", args[3] if len(args) > 3 else 0.0))
        return retrieve_many(self, texts, k, *args, **kwargs)

    monkeypatch.setattr(Retriever, "retrieve_many", spy)
    train(_config(setup, tmp_path / "out", model=str(start), steps=1))
    assert floors and set(floors) == {0.0}  # training reads every retrieved reference (the paper's schedule)
    assert model_min_relative_score(tmp_path / "out") == 0.5  # and the output reads as its start did


def test_bf16_autocast_only_where_the_hardware_has_bf16_units(setup, tmp_path):
    # emulated bf16 matmuls run 34x slower than float32 on an AVX2-only CPU: the default follows the flags
    assert cpuinfo_has_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert cpuinfo_has_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpuinfo_has_bf16("Features\t: fp asimd sve bf16 i8mm\n")  # aarch64
    assert not cpuinfo_has_bf16("flags\t\t: fpu sse2 avx2 fma f16c\nbugs\t\t: bf16\n")
    assert not cpuinfo_has_bf16("")
    report = train(_config(setup, tmp_path / "auto", bf16=None, steps=1))
    assert report["config"]["bf16"] is bf16_is_native("cpu")
    # the resolved setting is what a resume must match: the other one is refused, not mixed in

    def crash(e):
        if e["event"] == "step" and e["step"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(_config(setup, tmp_path / "t", bf16=None, steps=3, checkpoint_every=1), crash)
    with pytest.raises(M3Error, match="other settings"):
        train(_config(setup, tmp_path / "t", bf16=not bf16_is_native("cpu"), steps=3, checkpoint_every=1))
    assert train(_config(setup, tmp_path / "t", bf16=None, steps=3, checkpoint_every=1))["start_step"] == 1


def test_training_memories_equal_kb_memories(setup):
    kb = open_kb(setup / "kb")
    ck = load_checkpoint(setup / "model")
    t = kb.references().select(["ref_id", "token_ids"]).to_pydict()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            mems = encode_memories(ck.model, t["token_ids"], t["ref_id"], kb.spec, grad)
        assert t["ref_id"] and [m.ref_id for m in mems] == t["ref_id"]  # one memory a reference, none dropped
        for m in mems:
            stored = kb.memory(m.ref_id)
            assert torch.equal(m.positions, stored.positions), m.ref_id
            torch.testing.assert_close(m.keys.detach(), stored.keys, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m.values.detach(), stored.values, rtol=1e-6, atol=1e-6)
            assert m.keys.requires_grad == grad


def test_batched_training_forward_equals_text_logits(setup):
    kb = open_kb(setup / "kb")
    ck = load_checkpoint(setup / "model")
    layout = ReadLayout.from_manifest(kb.manifest, ck.tokenizer.bos_id, chunk_tokens=5)
    texts = [list(range(3, 15)), list(range(20, 27)), list(range(40, 43))]  # 3, 2 and 1 chunks
    mem = lambda ids: ChunkMemory.gather(kb.memories(ids), layout.memory_layers)  # noqa: E731
    chunks = [[mem([0, 1]), None, mem([2])], None, [mem([3, 4, 5])]]
    with torch.no_grad():
        logits, targets = batch_logits(ck.model, layout, texts, chunks)
    head = len(layout.head)
    for b, ids in enumerate(texts):
        want = text_logits(ck.model, layout, ids, chunks[b])  # (n, V)
        got = logits[b, head - 1:head - 1 + len(ids)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert targets[b, head - 1:head - 1 + len(ids)].tolist() == ids
        assert (targets[b] != -100).sum() == len(ids)
    # the memories matter: the same text without them gives other logits
    assert not torch.allclose(logits[0], batch_logits(ck.model, layout, texts, [None] * 3)[0][0])


def test_overlap_filter_drops_the_copied_reference(setup):
    kb = open_kb(setup / "kb")
    ck = load_checkpoint(setup / "model")
    copy_refs = {r["ref_id"] for r in kb.references().select(["ref_id", "doc_id"]).to_pylist() if r["doc_id"] == "d1.txt"}
    assert copy_refs
    text = (setup / "corpus" / "d1.txt").read_text()
    (setup / "one.txt").write_text(text)

    def refs(max_overlap):
        seqs = prepare_sequences(setup / "one.txt", ck.tokenizer, 64, 64, kb_retriever(setup / "kb", 3, "bm25", max_overlap))
        return set(seqs[0].chunk_refs[0])
    assert copy_refs <= refs(None)  # found by retrieval, as the best match
    assert not copy_refs & refs(0.9)  # and dropped by Eq. 6: the chunk contains the whole reference
    assert refs(0.9)  # other references still come


def test_memory_and_no_memory_steps_mix(setup):
    cfg = _config(setup, setup / "unused", steps=200, memory_fraction=0.25)
    used = [uses_memory(s, cfg) for s in range(200)]
    assert 30 <= sum(used) <= 70
    assert not any(uses_memory(s, _config(setup, "x", memory_fraction=0.0)) for s in range(50))
    assert all(uses_memory(s, _config(setup, "x", memory_fraction=1.0)) for s in range(50))
    # a memory step reads memories (its loss differs) and encodes them with gradients only when asked
    kb = open_kb(setup / "kb")
    ck = load_checkpoint(setup / "model")
    layout = ReadLayout.from_manifest(kb.manifest, ck.tokenizer.bos_id, chunk_tokens=8)
    t = kb.references().select(["ref_id", "token_ids"]).to_pydict()
    ref_tokens = dict(zip(t["ref_id"], t["token_ids"]))
    seqs = prepare_sequences(setup / "texts.jsonl", ck.tokenizer, 64, 8,
                             kb_retriever(setup / "kb", 2, None, 0.9))[:3]
    assert all(any(c) for s in seqs for c in [s.chunk_refs])
    losses, grads = {}, {}
    for mem, through in ((False, False), (True, False), (True, True)):
        ck.model.zero_grad()
        loss, n = step_loss(ck.model, layout, seqs, ref_tokens, mem, kb.spec, through)
        loss.backward()
        losses[mem, through] = loss.item()
        grads[mem, through] = ck.model.layers[0].attention.wk.weight.grad.clone()
    assert losses[True, False] != losses[False, False]
    assert losses[True, False] == pytest.approx(losses[True, True], abs=1e-6)
    assert not torch.allclose(grads[True, False], grads[True, True])  # the encoder path adds gradient


def _weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def test_deterministic_with_a_seed_and_it_learns(setup, tmp_path):
    r1 = train(_config(setup, tmp_path / "a"))
    r2 = train(_config(setup, tmp_path / "b"))
    train(_config(setup, tmp_path / "c", seed=1))
    assert r1["loss_curve"] == r2["loss_curve"]
    w1, w2, w3 = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert r1["memory_steps_this_run"] == sum(uses_memory(s, _config(setup, "x")) for s in range(6))
    assert r1["loss_curve"][-1]["loss"] < r1["loss_curve"][0]["loss"]
    # on the same tokens (the logged losses are of different batches): the training texts' mean NLL
    # without memory falls (gradient ascent, or a step that updated nothing, would not)
    from m3compile.lm import token_nll

    def text_nll(ck):
        texts = [json.loads(line)["text"] for line in (setup / "texts.jsonl").read_text().splitlines()]
        total, n = token_nll(ck.model, [[ck.tokenizer.bos_id] + ck.tokenizer.encode(t) for t in texts])
        return total / n

    assert text_nll(load_checkpoint(tmp_path / "a")) < text_nll(load_checkpoint(setup / "model")) - 1e-3
    # the output is an ordinary checkpoint that loads, with its training report beside it
    assert load_checkpoint(tmp_path / "a").args.n_layers == 2
    assert not (tmp_path / "a" / STATE_FILE).exists()


@pytest.mark.parametrize("through", [True, False], ids=["grad-through-memory", "detached-memory"])
def test_resume_equals_uninterrupted(setup, tmp_path, through):
    full = train(_config(setup, tmp_path / "full", grad_through_memory=through))

    def crash(e):
        if e["event"] == "step" and e["step"] == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(_config(setup, tmp_path / "part", checkpoint_every=3, grad_through_memory=through), crash)
    assert (tmp_path / "part" / STATE_FILE).is_file()
    with pytest.raises(M3Error, match="other settings"):
        train(_config(setup, tmp_path / "part", checkpoint_every=3, lr=1e-2, grad_through_memory=through))
    state = (tmp_path / "part" / STATE_FILE).read_bytes()
    (tmp_path / "part" / STATE_FILE).write_bytes(state[: len(state) // 2])  # cut short (a power loss)
    with pytest.raises(M3Error, match="training state is damaged: delete it"):
        train(_config(setup, tmp_path / "part", checkpoint_every=3, grad_through_memory=through))
    # a newer format's state is refused naming both versions (formats/README.md), not read as damaged
    from safetensors.torch import load, save
    (tmp_path / "part" / STATE_FILE).write_bytes(state)
    with safe_open(str(tmp_path / "part" / STATE_FILE), framework="pt") as f:
        meta = f.metadata()
    (tmp_path / "part" / STATE_FILE).write_bytes(save(load(state), {**meta, "format_version": "2"}))
    with pytest.raises(M3Error, match=r"format_version 2, newer than the version this m3compile reads \(1\)"):
        train(_config(setup, tmp_path / "part", checkpoint_every=3, grad_through_memory=through))
    (tmp_path / "part" / STATE_FILE).write_bytes(state)
    resumed = train(_config(setup, tmp_path / "part", checkpoint_every=3, grad_through_memory=through))
    assert resumed["start_step"] == 3
    assert resumed["loss_curve"] == full["loss_curve"]
    wf, wp = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wp[k]) for k in wf)


def test_batches_are_slices_of_seeded_epoch_permutations():
    # the definition, written out: epoch e's order is range(n) shuffled by Random(f"{seed}/epoch/{e}"), and
    # step s takes flat positions s*B .. (s+1)*B - 1 of the epochs laid end to end. Kept orders must not
    # leak between seeds, sizes or epochs, and a step across an epoch's end takes from both
    def order(seed, epoch, n):
        perm = list(range(n))
        random.Random(f"{seed}/epoch/{epoch}").shuffle(perm)
        return perm

    for n, B, seed in [(7, 3, 0), (7, 3, 1), (8, 3, 0), (5, 16, 2), (1000, 16, 0)]:
        flat = [i for e in range(60 * B // n + 2) for i in order(seed, e, n)]
        for step in list(range(12)) + [59, 3, 0]:  # out of order too, as a resumed run asks
            assert batch_indices(step, n, B, seed) == flat[step * B:(step + 1) * B], (n, B, seed, step)
    assert sorted(batch_indices(0, 5, 5, 0)) == list(range(5))  # an epoch is a permutation
    # seeds that a cache would take for one (1 == 1.0 == True) shuffle apart, as their strings do
    for seed in (1, 1.0, True):
        assert batch_indices(0, 50, 50, seed) == order(seed, 0, 50), seed


def test_schedules():
    c = TrainConfig(model="m", kb="k", texts="t", out="o", steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(99, c) == pytest.approx(0.1, abs=1e-3)
    w = TrainConfig(model="m", kb="k", texts="t", out="o", steps=100, lr=1.0, min_lr=0.1, warmup_steps=10,
                    schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w) == lr_at(79, w) == 1.0 and lr_at(99, w) == pytest.approx(0.1)
    # a peak under the floor stays the most the rate reaches (it rose towards min_lr after warmup)
    for schedule in ("cosine", "wsd"):
        low = TrainConfig(model="m", kb="k", texts="t", out="o", steps=100, lr=0.05, min_lr=0.1, warmup_steps=10,
                          schedule=schedule)
        assert max(lr_at(i, low) for i in range(100)) == pytest.approx(0.05) and lr_at(99, low) == pytest.approx(0.05)
    with pytest.raises(M3Error):
        TrainConfig(model="m", kb="k", texts="t", out="o", schedule="linear")


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    # the subprocess timeouts guard against a hang, they check no speed: the smoke run takes under
    # a minute on a 2-core AMX machine and ~80 s on a 2-core AVX2-only one in float32 (2026-12-02)
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke", "--work", str(tmp_path), "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    for mode in ("none", "sparse", "rag", "other"):
        assert res["trained"]["held_out"][mode]["question"]["facts"] > 0
    # the read diagnostics on the same work directory: read as the kb is read, they give the
    # benchmark's own sparse figures (same world, split, records, kb and model)
    bench = bench.parent / "read_diagnostics.py"
    proc = subprocess.run([sys.executable, str(bench), "--work", str(tmp_path), "--kb", str(tmp_path / "kb-trained"),
                           "--model", str(tmp_path / "trained"), "--entities", "40", "--held-out", "0.1",
                           "--memory-only", "0.6", "--eval-limit", "40"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diag = json.loads(proc.stdout.splitlines()[-1])
    sparse = res["trained"]["held_out"]["sparse"]
    assert diag["refs/chunk 5"] == {k: sparse[k]["fact_acc"] for k in ("question", "restatement")}
    assert set(diag) == {"refs/chunk 1", "refs/chunk 2", "refs/chunk 5", "own refs", "titled", "sequential"}
    # --eval-only: the same world's warm evaluation of a given model, and no training
    proc = subprocess.run([sys.executable, str(bench.parent / "train_memory.py"), "--smoke", "--eval-only",
                           "--work", str(tmp_path / "e"), "--start-from", str(tmp_path / "trained"),
                           "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((tmp_path / "e.json").read_text())
    assert "trained" not in ev and not (tmp_path / "e" / "trained").exists()
    assert ev["warm"]["held_out"]["sparse"] == res["trained"]["held_out"]["sparse"]  # that model, that world



@pytest.mark.slow
def test_stories_benchmark_smoke(tmp_path):
    # the stories260K half of issue 6 end to end on a few stories: held-out stories are never
    # training text, every row is measured before and after, and a little training at a small lr
    # keeps the trained model's no-memory perplexity where it was
    shared("stories260k"), shared("tinystories-val")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "train_stories.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke", "--work", str(tmp_path), "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, M3_SHARED_DATA=str(SHARED_DATA)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    held = {json.loads(line)["id"] for line in (tmp_path / "all.jsonl").read_text().splitlines()[:6]}
    train_ids = {json.loads(line)["id"] for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert len(held) == 6 and not held & train_ids
    before, after = res["before"]["oracle"]["no_memory"]["ppl"], res["after"]["oracle"]["no_memory"]["ppl"]
    assert before < 4.5 and abs(after / before - 1) < 0.05, (before, after)  # a trained model, barely moved
    assert [p["step"] for p in res["curve"]] == [0, 4, 8]
    for when in ("before", "after"):
        for how in ("oracle", "retrieved"):
            rows = res[when][how]
            assert rows["sparse"]["tokens"] == rows["no_memory"]["tokens"] > 0

def test_m3_train_cli_writes_a_loadable_checkpoint(setup, tmp_path):
    from typer.testing import CliRunner

    from m3compile.cli import app

    r = CliRunner().invoke(app, ["train", "--model", str(setup / "model"), "--kb", str(setup / "kb"),
                                 "--texts", str(setup / "texts.jsonl"), "-o", str(tmp_path / "out"),
                                 "--steps", "2", "--batch-size", "2", "--fp32"])
    assert r.exit_code == 0, r.output
    assert "recompile" in r.stdout
    # the checkpoint records the kb settings it learned to read, and a compile with it takes them
    assert read_model_memory(tmp_path / "out") == {"max_tokens": 16, "boundary": "sentence", "min_fill": 0.75,
                                                   "prefix": "Reference:", "top_k": 3, "memory_layers": (0,)}
    r = CliRunner().invoke(app, ["compile", str(setup / "corpus"), "-o", str(tmp_path / "kb2"),
                                 "--model", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "--max-tokens 16" in r.stderr and "--top-k 3" in r.stderr
    write = open_kb(tmp_path / "kb2").manifest.write
    assert (write["max_tokens"], write["top_k"], write["memory_layers"]) == (16, 3, [0])
    trained = load_checkpoint(tmp_path / "out")
    original = load_checkpoint(setup / "model")
    assert not torch.equal(trained.model.layers[0].attention.wq.weight, original.model.layers[0].attention.wq.weight)
    r = CliRunner().invoke(app, ["train", "--model", str(setup / "model"), "--kb", str(setup / "kb"),
                                 "--texts", str(setup / "nope.jsonl"), "-o", str(tmp_path / "out2")])
    assert r.exit_code == 1 and "error:" in r.stderr


def test_an_output_that_is_not_a_new_run_is_refused(setup, tmp_path):
    # -o was only checked for being a file: -o set to the input model wrote over its weights, and a
    # finished run's directory was trained into again from step 0, its old files beside the new
    from m3compile.errors import M3Error
    from m3compile.train import train

    before = (setup / "model" / "model.safetensors").read_bytes()
    with pytest.raises(M3Error, match="is the input model"):
        train(_config(setup, setup / "model", steps=1))
    assert (setup / "model" / "model.safetensors").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    with pytest.raises(M3Error, match="holds files and no unfinished run"):
        train(_config(setup, tmp_path / "notes", steps=1))
    train(_config(setup, tmp_path / "out", steps=1))
    with pytest.raises(M3Error, match="holds files and no unfinished run"):  # finished: not trained again
        train(_config(setup, tmp_path / "out", steps=1))
    assert not (tmp_path / "out" / "train-state.safetensors").exists() and (tmp_path / "out" / "config.json").is_file()


def test_sequences_past_the_models_positions_are_refused(setup, tmp_path):
    # a training sequence ran at RoPE positions past max_position_embeddings (never trained on),
    # silently; --seq-tokens (now a CLI option too) is checked against the read layout's room
    from typer.testing import CliRunner

    from m3compile.cli import app
    from m3compile.errors import M3Error
    from m3compile.kb import open_kb
    from m3compile.model import load_checkpoint
    from m3compile.reader import ReadLayout
    from m3compile.train import train

    ck = load_checkpoint(setup / "model")
    room = ck.args.max_seq_len - ReadLayout.from_spec(open_kb(setup / "kb").spec, ck.tokenizer.bos_id, 8).text_positions(0)
    with pytest.raises(M3Error, match=f"--seq-tokens {room + 1} does not fit the model.*use --seq-tokens {room} or less"):
        train(_config(setup, tmp_path / "a", steps=1, seq_tokens=room + 1))
    assert not (tmp_path / "a").exists()
    train(_config(setup, tmp_path / "b", steps=1, seq_tokens=room))
    r = CliRunner().invoke(app, ["train", "--model", str(setup / "model"), "--kb", str(setup / "kb"), "--texts",
                                 str(setup / "texts.jsonl"), "-o", str(tmp_path / "c"), "--steps", "1",
                                 "--seq-tokens", str(room + 1)])
    assert r.exit_code == 1 and f"--seq-tokens {room + 1} does not fit" in r.stderr, r.output


def test_a_kb_with_nothing_before_the_text_is_one_error(setup, tmp_path, monkeypatch):
    # a kb written before compiles refused an empty write prefix without BOS: its texts' first token
    # had no target row (an empty slice of the targets)
    from dataclasses import replace

    from m3compile import train as train_mod
    from m3compile.errors import M3Error
    from m3compile.kb import open_kb
    from m3compile.model import load_checkpoint

    def headless_kb(path):
        kb = open_kb(path)
        kb.manifest.__dict__["spec"] = kb.spec = replace(kb.spec, prefix_ids=())  # as such a kb records it
        return kb

    def no_bos(*a, **k):
        ck = load_checkpoint(*a, **k)
        ck.tokenizer.bos_id = None
        return ck

    monkeypatch.setattr(train_mod, "open_kb", headless_kb)
    monkeypatch.setattr(train_mod, "load_checkpoint", no_bos)
    with pytest.raises(M3Error, match="no token comes before a text"):
        train_mod.train(_config(setup, tmp_path / "out", steps=1))
    assert not (tmp_path / "out").exists()


def test_training_reads_the_retrieved_references_token_ids_by_row_group(setup, monkeypatch):
    # the whole references table (texts too) was read as Python lists before training began; now the
    # retrieved references' ids, in passes of RETRIEVED_AT_ONCE, and an absent one is one error
    from m3compile import train as train_mod
    from m3compile.errors import M3Error
    from m3compile.kb import open_kb

    kb = open_kb(setup / "kb")
    table = {r["ref_id"]: r["token_ids"] for r in kb.references().to_pylist()}
    monkeypatch.setattr(train_mod, "RETRIEVED_AT_ONCE", 2)
    some = sorted(table)[1::2]
    assert train_mod.retrieved_tokens(kb, some + some[:1]) == {i: table[i] for i in some} and len(some) > 2
    with pytest.raises(M3Error, match="is not in .*references.parquet"):
        train_mod.retrieved_tokens(kb, [max(table) + 1])
