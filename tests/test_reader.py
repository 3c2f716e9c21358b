"""The read side: memory attention (paper Eq. 4) is exact, chunk-local, and decodes like it scores."""

import pytest
import torch

from conftest import make_checkpoint
from m3compile.config import CompileConfig
from m3compile.kb import open_kb
from m3compile.model import load_checkpoint
from m3compile.pipeline import compile_kb
from m3compile.reader import ChunkMemory, ReadLayout, build_extra, full_memories, generate, text_logits

pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoints")


@pytest.fixture
def setup(tmp_path):
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", dict(num_hidden_layers=3))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(f"w{i}" for i in range(10, 30)))
    (tmp_path / "corpus" / "b.txt").write_text(" ".join(f"w{i}" for i in range(60, 75)))
    ck = load_checkpoint(tmp_path / "model")
    return tmp_path, ck


def compile_all_layers(tmp_path, top_k=32):
    # every layer a memory layer, every token kept, lossless: memory must equal context exactly
    cfg = CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), top_k=top_k,
                        memory_layers=(0, 1, 2), quant="none", prefix="w5 w6")
    compile_kb(cfg, tmp_path / "kb")
    return open_kb(tmp_path / "kb")


def test_memory_equals_the_same_tokens_as_context(setup):
    tmp_path, ck = setup
    kb = compile_all_layers(tmp_path)
    layout = ReadLayout.from_manifest(kb.manifest, ck.tokenizer.bos_id)
    assert layout.prefix_ids == (1, 5, 6) and layout.interval == 128
    ref = kb.references().to_pylist()[0]
    text = [40, 41, 42, 43, 44, 45, 46]
    with_memory = text_logits(ck.model, layout, text, [ChunkMemory.gather([kb.memory(0)], layout.memory_layers)])
    # the same reference tokens as ordinary context, at the positions they were written at
    p, n = 3, ref["n_tokens"]
    ids = list(layout.prefix_ids) + ref["token_ids"] + [1] + text
    pos = list(range(p + n)) + [p + 128 + i for i in range(len(text) + 1)]
    with torch.no_grad():
        logits = ck.model(torch.tensor([ids]), positions=torch.tensor([pos]))[0]
    as_context = logits[p + n:p + n + len(text)]
    assert (with_memory - as_context).abs().max() <= 1e-4
    no_memory = text_logits(ck.model, layout, text)
    assert (no_memory - as_context).abs().max() > 1e-2  # the memory changes something


def test_on_the_fly_full_memories_equal_lossless_kb(setup):
    tmp_path, ck = setup
    kb = compile_all_layers(tmp_path)
    rows = kb.references().to_pylist()
    fresh = full_memories(ck.model, [r["token_ids"] for r in rows], [r["ref_id"] for r in rows], kb.spec, (0, 1, 2))
    assert rows  # every reference compared: a memorize that returned fewer would fail strict zip
    for r, f in zip(rows, fresh, strict=True):
        assert f.ref_id == r["ref_id"]
        stored = kb.memory(r["ref_id"])
        assert torch.equal(stored.positions, f.positions)
        assert (stored.keys - f.keys).abs().max() <= 1e-5 and (stored.values - f.values).abs().max() <= 1e-5


def test_chunks_see_only_their_own_memories(setup):
    tmp_path, ck = setup
    kb = compile_all_layers(tmp_path, top_k=4)
    layout = ReadLayout(kb.prefix_ids, 1, (0, 1, 2), chunk_tokens=4)
    a = ChunkMemory.gather([kb.memory(0)], layout.memory_layers)
    b = ChunkMemory.gather([kb.memory(1)], layout.memory_layers)
    extra = build_extra([a, None, b], layout.chunk_of(10), "cpu", torch.float32)
    vis = extra[0].visible[0]  # (T, M): 3 prefix, BOS, 10 text tokens; 2 heads x 4 kept x 2 refs
    assert vis.shape == (14, 8)
    assert not vis[:3].any()  # the prefix sees no memory
    assert vis[3:8, :4].all() and not vis[3:8, 4:].any()  # BOS + text 0..3: chunk 0, reference a
    assert not vis[8:12].any()  # chunk 1 has none
    assert vis[12:, 4:].all() and not vis[12:, :4].any()  # chunk 2: reference b
    text = list(range(40, 50))
    base = text_logits(ck.model, layout, text, [a, None, None])
    moved = text_logits(ck.model, layout, text, [a, None, b])
    # a later chunk's memory cannot reach earlier tokens (beyond float noise of a wider matmul)
    assert (base[:7] - moved[:7]).abs().max() <= 1e-6
    assert (base[7:] - moved[7:]).abs().max() > 1e-3


def test_generation_with_cache_follows_the_scored_path(setup):
    tmp_path, ck = setup
    kb = compile_all_layers(tmp_path, top_k=4)
    layout = ReadLayout(kb.prefix_ids, 1, (0, 1, 2), chunk_tokens=4)
    mem = ChunkMemory.gather([kb.memory(0), kb.memory(1)], layout.memory_layers)
    calls = []

    def retrieve(tokens):
        calls.append(list(tokens))
        return mem

    prompt = [40, 41, 42, 43, 44, 45]
    new = generate(ck.model, layout, prompt, retrieve, max_new_tokens=9)
    # prompt chunks retrieve with their own text; then every 4 generated tokens retrieve again, for
    # the next token fed (new[8], the last asked, is not fed: nothing reads new[4:8]'s memories)
    assert calls == [prompt[:4], prompt[4:], new[:4]]
    # with one memory everywhere, greedy decoding equals the argmax of the teacher-forced scores
    seq = prompt + new
    logits = text_logits(ck.model, layout, seq, [mem] * 4)
    assert logits[len(prompt):].argmax(-1).tolist() == new



def test_each_generated_token_reads_its_own_chunks_memories(setup):
    # the last token of a generated chunk was fed with the next chunk's memories (retrieved as soon
    # as it was sampled), so its key-values, which every later token attends to, were not those
    # teacher-forced scoring gives it. With other memories in every chunk, greedy generation must
    # equal the argmax of text_logits under the schedule's memories; no retrieval is made past the
    # last token
    tmp_path, ck = setup
    kb = compile_all_layers(tmp_path, top_k=4)
    layout = ReadLayout(kb.prefix_ids, 1, (0, 1, 2), chunk_tokens=4)
    mems = [ChunkMemory.gather(m, layout.memory_layers) for m in ([kb.memory(0)], [kb.memory(1)], [kb.memory(1), kb.memory(0)])]
    calls = []

    def retrieve(tokens):
        calls.append(list(tokens))
        return mems[(len(calls) - 1) % len(mems)]

    prompt = [40, 41, 42, 43]  # one whole chunk: generated chunks fall on text chunks 1, 2, 3
    new = generate(ck.model, layout, prompt, retrieve, max_new_tokens=12)
    assert len(new) == 12 and calls == [prompt, new[:4], new[4:8]]
    # text chunk 0: the prompt's memories; chunk 1 inherits them; then one retrieval a chunk
    logits = text_logits(ck.model, layout, prompt + new, [mems[0], mems[0], mems[1], mems[2]])
    assert logits[len(prompt):].argmax(-1).tolist() == new
    # a chunk ended by EOS retrieves nothing after it: the next chunk's memories were fetched as
    # soon as a chunk's last token was fed, and reported as read though no token read them
    stop = next(i for i in range(4, 12, 4) if new[i] not in new[:i])  # a token that first comes at a chunk start
    calls.clear()
    assert generate(ck.model, layout, prompt, retrieve, max_new_tokens=12, eos_id=new[stop]) == new[:stop]
    assert calls == [prompt] + [new[i:i + 4] for i in range(0, stop - 4, 4)]


def test_generation_stays_within_a_sliding_window_and_a_full_layout_is_one_error(tmp_path):
    # a Mistral window shorter than max_position_embeddings: generation was capped by the positions
    # only, and the runtime refused the first forward past the window mid-generation (its tokens
    # lost); it is now capped by the window, with a note. A kb whose layout fills the window said
    # "shorten the prompt to at most -1 tokens"
    from m3compile.errors import M3Error
    from m3compile.generation import generate_text

    make_checkpoint(tmp_path / "model", "MistralForCausalLM", dict(sliding_window=48))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(f"w{i}" for i in range(3, 60)))
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=8, top_k=4),
               tmp_path / "kb")
    notes = []
    r = generate_text("w5 w6 w7 w8 w9", kb=str(tmp_path / "kb"), max_new_tokens=200, log=notes.append)
    layout_before_text = ReadLayout.from_spec(open_kb(tmp_path / "kb").spec, 1).text_positions(0)
    assert r.new_tokens == 48 - layout_before_text - 5 + 1  # the last token is never fed: it needs no position
    assert any("sliding_window" in n and f"generating at most {r.new_tokens}" in n for n in notes), notes
    # a width that leaves the text no position in the window is refused when compiled (it compiled,
    # and no text could be read with it)
    widest = 48 - len(open_kb(tmp_path / "kb").spec.prefix_ids) - 2  # the BOS and one text token
    with pytest.raises(M3Error, match=f"--max-tokens {widest + 1} does not fit the model: it has 48 positions "
                                      f"\\(sliding_window\\).*use at most {widest}"):
        compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=widest + 1,
                                 top_k=4), tmp_path / "wide")
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=widest,
                             top_k=4), tmp_path / "wide")
    assert generate_text("w5", kb=str(tmp_path / "wide"), max_new_tokens=5).new_tokens == 1
    assert generate_text("w5", kb=str(tmp_path / "wide"), max_new_tokens=2, seed=-1, temperature=0.8).new_tokens == 1
    # a kb compiled before the check with the width it allowed then (the write's room alone) is
    # still grown, checked and repaired; reading it is one error saying no text fits
    from m3compile import spec as spec_mod
    from m3compile.pipeline import check_kb, repair_kb
    from m3compile.verify import verify_kb

    old = widest + 2
    with pytest.MonkeyPatch.context() as mp:
        real = spec_mod.MemorySpec.from_config.__func__
        mp.setattr(spec_mod.MemorySpec, "from_config",
                   classmethod(lambda cls, config, ck, model_id, kept_width=None: real(cls, config, ck, model_id,
                                                                                        config.max_tokens)))
        cfg = CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model"), max_tokens=old, top_k=4)
        compile_kb(cfg, tmp_path / "old")
    (tmp_path / "corpus" / "b.txt").write_text(" ".join(f"w{i}" for i in range(60, 100)))
    assert check_kb(cfg, tmp_path / "old") != []
    assert compile_kb(cfg, tmp_path / "old").summary["documents"]["added"] == 1
    assert check_kb(cfg, tmp_path / "old") == []
    repair_kb(tmp_path / "old")  # a kb of a width the model no longer fits stays repairable: verify finds no fault
    assert verify_kb(tmp_path / "old") == []
    with pytest.raises(M3Error, match="before the text: no text fits"):
        generate_text("w5", kb=str(tmp_path / "old"), max_new_tokens=5)
    with pytest.raises(M3Error, match=f"--max-tokens {old} does not fit"):
        compile_kb(cfg, tmp_path / "new")
    with pytest.raises(M3Error, match=f"--max-tokens {old} does not fit"):  # a rebuild writes a new kb
        compile_kb(cfg, tmp_path / "old", rebuild=True)
    assert check_kb(cfg, tmp_path / "old") == []  # and left the old one as it was


def test_generation_without_a_kb_reads_as_a_kb_without_memory_would(tmp_path):
    # a model whose m3-memory.json names only some settings: without a kb, generation used no write
    # prefix (not even the BOS) and a memory interval of 0 for the missing ones, where a kb compiled
    # with the model (and `--kb KB --no-memory`) takes the paper's
    import json

    from m3compile.generation import generate_text

    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    (tmp_path / "model" / "m3-memory.json").write_text(json.dumps(
        {"format": "m3-model-memory", "format_version": 1, "settings": {"top_k": 4, "max_tokens": None}}))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(f"w{i}" for i in range(3, 60)))
    compile_kb(CompileConfig(corpus=str(tmp_path / "corpus"), model=str(tmp_path / "model")), tmp_path / "kb")
    assert open_kb(tmp_path / "kb").spec.width == 128 and len(open_kb(tmp_path / "kb").spec.prefix_ids) > 1
    prompt = "w5 w6 w7 w8 w9 w10 w11"
    alone = generate_text(prompt, model=str(tmp_path / "model"), max_new_tokens=12)
    kb = generate_text(prompt, kb=str(tmp_path / "kb"), memory=False, max_new_tokens=12)
    assert alone.text == kb.text and alone.new_tokens == 12 and not alone.memory
