"""The runtime against transformers (the independent implementation) on small random checkpoints
saved with `save_pretrained`, one per supported architecture and feature; and refusals."""

import json
import sys

import pytest
import torch

from m3compile.errors import M3Error
from m3compile.model import ModelArgs, PackedRows, Transformer, load_checkpoint, save_checkpoint
from conftest import CHECKPOINT_CASES, SMALL, make_checkpoint, oracle, write_word_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the test-only parity oracle")

@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_parity_with_transformers(tmp_path, case):
    arch, overrides = CHECKPOINT_CASES[case]
    ref = make_checkpoint(tmp_path, arch, overrides)
    ref.config._attn_implementation = "eager"
    if case == "llama-sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ck = load_checkpoint(tmp_path)
    a = ck.args
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SMALL["vocab_size"], (2, 40), generator=g)
    ref_logits, proj, cache = oracle(ref, ids)
    with torch.no_grad():
        logits = ck.model(ids)
        kvs = ck.model.forward_kv(ids, layers=range(a.n_layers))
    assert (logits - ref_logits).abs().max() <= 1e-4
    B, T = ids.shape
    for i in range(a.n_layers):
        kv = kvs[i]
        q_ref = proj[(i, "q_proj")].view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k_ref = proj[(i, "k_proj")].view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v_ref = proj[(i, "v_proj")].view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        assert kv.q_pre.shape == (B, a.n_heads, T, a.head_dim)
        assert (kv.q_pre - q_ref).abs().max() <= 1e-5
        assert (kv.k_pre - k_ref).abs().max() <= 1e-5
        assert (kv.k_post - cache.layers[i].keys).abs().max() <= 1e-5
        assert (kv.v - cache.layers[i].values).abs().max() <= 1e-5
        assert (kv.v - v_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_unpadded(tmp_path, side):
    ref = make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ref.config._attn_implementation = "eager"
    ck = load_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(2)
    lengths = [23, 9]
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in lengths]
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
        ids[b, sl], mask[b, sl] = row, True
    with torch.no_grad():
        logits = ck.model(ids, attention_mask=mask)
        kvs = ck.model.forward_kv(ids, layers=[1], attention_mask=mask)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ref_logits, _, cache = oracle(ref, ids, mask=mask.long(), position_ids=positions)
    for b, row in enumerate(rows):
        alone = ck.model(row[None])[0]
        real = mask[b]
        assert (logits[b, real] - alone).abs().max() <= 1e-4
        assert (logits[b, real] - ref_logits[b, real]).abs().max() <= 1e-4
        assert (kvs[1].k_post[b][:, real] - cache.layers[1].keys[b][:, real]).abs().max() <= 1e-5


def test_forward_kv_stops_after_last_requested_layer(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", dict(num_hidden_layers=4))
    model = load_checkpoint(tmp_path).model
    ran = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(("block", i)))
        layer.feed_forward.register_forward_hook(lambda m, a, o, i=i: ran.append(("mlp", i)))
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        out = model.forward_kv(ids, layers=[0, 1])
    assert sorted(out) == [0, 1]
    # block 0 runs whole; of block 1 only the projections; blocks 2 and 3 not at all
    assert ran == [("mlp", 0), ("block", 0)]


@pytest.mark.parametrize("units", [True, False], ids=["bf16-units", "no-bf16-units"])
def test_bfloat16_close_to_float32(tmp_path, monkeypatch, units):
    """On either path of a bf16 product (CPU_BF16_UNITS: torch's bf16 matmul, or float32 on the
    operands cast up where the CPU has no bf16 units)."""
    import m3compile.model as model_module

    monkeypatch.setattr(model_module, "CPU_BF16_UNITS", units)
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ids = torch.randint(3, 120, (2, 30))
    with torch.no_grad():
        l32 = load_checkpoint(tmp_path).model(ids)
        m16 = load_checkpoint(tmp_path, dtype="bfloat16").model
        assert m16.dtype == torch.bfloat16
        l16 = m16(ids).float()
    # bf16 keeps ~3 significant digits; logits of this scale agree to a few hundredths
    assert (l16 - l32).abs().max() < 0.05 * l32.abs().max()


# bf16 products as this CPU runs them (None), and in float32 as a CPU without bf16 units runs them
BF16_PATHS = [("float32", None), ("bfloat16", None), ("bfloat16", False)]


def _bf16_units(monkeypatch, units: bool | None) -> None:
    """Force model.CPU_BF16_UNITS (False: bf16 products in float32), or leave it (None)."""
    if units is not None:
        import m3compile.model as model_module

        monkeypatch.setattr(model_module, "CPU_BF16_UNITS", units)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=1e-30))) - 7)


def test_bf16_products_without_bf16_units_run_in_float32_and_round_once(monkeypatch):
    """Where the CPU has no bf16 units torch emulates bf16 matmuls (~9x slower than float32 on an
    AVX2 CPU), so model.linear and model.matmul compute a bf16 product as float32 on the operands
    cast up and round it once: within one bf16 ulp of the exact (float64) product, the weight cast
    in parts where it is large, the same with or without a bias. Below UPCAST_MIN_ROWS rows, and
    on a CPU with units, torch's own bf16 product runs."""
    import m3compile.model as model_module
    from m3compile.model import UPCAST_MIN_ROWS, linear, matmul

    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(x.dtype) or real(x, w, b))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 96, generator=g).bfloat16()  # 48 rows
    w, b = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    exact = x.double() @ w.double().T + b.double()  # (3, 16, 40)
    # one bf16 rounding of a float32 sum of 97 terms: within an ulp of the exact value, plus float32's
    # accumulation bound (n * 2^-24 * sum of |terms|) for results that cancel to near zero
    bound = _bf16_ulp(exact) + 97 * 2.0**-24 * ((x.double().abs() @ w.double().abs().T) + b.double().abs())

    monkeypatch.setattr(model_module, "CPU_BF16_UNITS", False)
    whole = linear(x, w, b)
    assert whole.dtype == torch.bfloat16 and seen == [torch.float32]
    assert ((whole.double() - exact).abs() <= bound).all()
    seen.clear()
    bare, at_min = linear(x, w), linear(x[0, :UPCAST_MIN_ROWS], w)  # no bias; exactly the threshold's rows
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(bare, real(x.float(), w.float()).bfloat16())
    assert torch.equal(at_min, real(x[0, :UPCAST_MIN_ROWS].float(), w.float()).bfloat16())
    monkeypatch.setattr(model_module, "UPCAST_CHUNK", 96 * 7)  # the weight in 6 parts of <= 7 rows
    seen.clear()
    parts = linear(x, w, b)
    assert len(seen) == 6 and ((parts.double() - exact).abs() <= bound).all()
    seen.clear()
    in_parts, exact_bare = linear(x, w), x.double() @ w.double().T  # in parts without a bias
    bound_bare = _bf16_ulp(exact_bare) + 96 * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert len(seen) == 6 and ((in_parts.double() - exact_bare).abs() <= bound_bare).all()
    a, c = torch.randn(2, 4, 24, 64, generator=g).bfloat16(), torch.randn(2, 4, 64, 30, generator=g).bfloat16()
    prod = matmul(a, c)
    ref = a.double() @ c.double()
    tol = _bf16_ulp(ref) + 64 * 2.0**-24 * (a.double().abs() @ c.double().abs())
    assert prod.dtype == torch.bfloat16 and ((prod.double() - ref).abs() <= tol).all()
    assert torch.equal(prod, (a.float() @ c.float()).bfloat16())  # the float32 product, not torch's bf16 one

    seen.clear()
    small = x[0, :UPCAST_MIN_ROWS - 1]
    assert torch.equal(linear(small, w, b), real(small, w, b)) and seen == [torch.bfloat16]
    monkeypatch.setattr(model_module, "CPU_BF16_UNITS", True)
    seen.clear()
    assert torch.equal(linear(x, w, b), real(x, w, b)) and seen == [torch.bfloat16]
    assert torch.equal(matmul(a, c), a @ c)
    assert torch.equal(linear(x.float(), w.float()), real(x.float(), w.float()))  # float32 untouched


@pytest.mark.parametrize("case", ["llama-gqa", "llama-bias", "qwen2-bias-tied"])
@pytest.mark.parametrize("dtype, units", BF16_PATHS)
def test_inference_path_gives_the_bits_of_the_autograd_path(tmp_path, monkeypatch, dtype, units, case):
    """Without autograd the blocks work in place (RMSNorm, SwiGLU, residuals; float32 RMSNorm is
    torch's fused kernel) and forward_kv runs everything but attention on the real tokens' rows
    only (PackedRows), their q/k/v as one matmul (Attention._qkv, biases included): the logits and
    the real tokens' key-values must be the same bits as the plain out-of-place path that training
    runs, padding and GQA included. Padding positions' q/k/v are unspecified (zeros when packed):
    every reader masks them. (Grouped-query attention without repeated k and v runs on both paths;
    its bits are held by the golden kb, a float32 GQA model: tests/test_golden_kb.py.)"""
    _bf16_units(monkeypatch, units)
    make_checkpoint(tmp_path, *CHECKPOINT_CASES[case])  # GQA: 4 query heads on 2 kv heads
    model = load_checkpoint(tmp_path, dtype=dtype).model
    assert model.args.n_heads > model.args.n_kv_heads
    assert model.args.qkv_bias == (case != "llama-gqa")
    ids = torch.randint(3, 120, (3, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.arange(21)[None] < torch.tensor([[21], [13], [5]])
    with torch.enable_grad():
        logits = model(ids, attention_mask=mask)
        kv = model.forward_kv(ids, [0, 1], attention_mask=mask)
    assert logits.requires_grad  # the autograd path really ran
    with torch.inference_mode():
        fast = model(ids, attention_mask=mask)
        fast_kv = model.forward_kv(ids, [0, 1], attention_mask=mask)
        assert PackedRows.of(mask, model.device) is not None  # the packed path is the one tested
    assert torch.equal(fast, logits.detach())
    for layer in (0, 1):
        for a, b in zip(fast_kv[layer], kv[layer]):  # (B, heads, T, D): real tokens only
            assert torch.equal(a.transpose(1, 2)[mask], b.detach().transpose(1, 2)[mask])


@pytest.mark.parametrize("dtype, units", BF16_PATHS)
def test_a_memory_is_the_same_bits_in_any_batch(monkeypatch, dtype, units):
    """Packed rows make a batch's projections as tall as its real tokens, so a reference's
    neighbours change the row count of every matmul. Its memory must not change with them (resumed
    and incremental compiles rely on it): the embedded reader's memories of references alone and in
    batches of other sizes, peers and lengths (padding) are the same bits."""
    from m3compile.config import CompileConfig, default_model_dir
    from m3compile.checkpoint import fingerprint
    from m3compile.spec import MemorySpec, memorize

    _bf16_units(monkeypatch, units)
    path = default_model_dir()
    config, _ = CompileConfig(corpus=".", dtype=dtype).resolved(path)
    ck = load_checkpoint(path, dtype=dtype)
    spec = MemorySpec.from_config(config, ck, fingerprint(path))
    g = torch.Generator().manual_seed(7)
    refs = [torch.randint(3, ck.args.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(1, spec.width + 1, (40,), generator=g)]
    alone = [memorize(ck.model, [r], spec)[0] for r in refs]
    for size in (2, 5, 16, 40):
        mask = torch.zeros(size, spec.width, dtype=torch.bool)
        for b, r in enumerate(refs[:size]):
            mask[b, :len(r)] = True
        with torch.no_grad():
            assert PackedRows.of(mask, ck.model.device) is not None  # these batches take the packed path
        for start in range(0, len(refs), size):
            got = memorize(ck.model, refs[start:start + size], spec)
            for m, want in zip(got, alone[start:start + size]):
                assert torch.equal(m.keys, want.keys) and torch.equal(m.values, want.values)
                assert torch.equal(m.positions, want.positions)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu(tmp_path, dtype):
    make_checkpoint(tmp_path, "Qwen2ForCausalLM", {})
    ids = torch.randint(3, 120, (2, 30))
    with torch.no_grad():
        cpu = load_checkpoint(tmp_path, dtype="float32").model(ids)
        gpu = load_checkpoint(tmp_path, device="cuda", dtype=dtype).model(ids.cuda()).float().cpu()
    tol = 1e-4 if dtype == "float32" else 0.05 * cpu.abs().max()
    assert (gpu - cpu).abs().max() <= tol


def test_save_checkpoint_round_trips_through_transformers(tmp_path):
    args = ModelArgs(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)
    model = Transformer(args).init_weights(seed=3)
    save_checkpoint(model, tmp_path, bos_id=1, eos_id=2)
    write_word_tokenizer(tmp_path, 120)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 120, (1, 20))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
        assert (load_checkpoint(tmp_path).model(ids) - model(ids)).abs().max() == 0


SAVE_CASES = {
    **{c: CHECKPOINT_CASES[c] for c in ("llama-gqa", "llama-bias", "llama-tied", "llama3-rope",
                                        "mistral-head-dim", "qwen2-bias-tied")},
    "mistral-no-window": ("MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-window": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
    "qwen2-head-dim-rope": ("Qwen2ForCausalLM", dict(head_dim=24, rope_parameters={
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_saved_checkpoint_is_the_same_model_to_transformers(tmp_path, case):
    from safetensors import safe_open
    from m3compile.checkpoint import fingerprint

    arch, overrides = SAVE_CASES[case]
    src, out = tmp_path / "src", tmp_path / "out"
    ref = make_checkpoint(src, arch, overrides)
    ck = load_checkpoint(src)
    save_checkpoint(ck.model, out, tokenizer_dir=src, bos_id=1, eos_id=2)
    saved = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(saved) is type(ref)
    # transformers' own reading of the window (MistralConfig turns an absent key into 4096)
    assert getattr(saved.config, "sliding_window", None) == ck.args.sliding_window
    cfg = json.loads((out / "config.json").read_text())
    if ck.args.rope_scaling:  # transformers <5 reads the scaling from rope_scaling only
        assert cfg["rope_scaling"] == {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
        assert cfg["rope_scaling"]["rope_type"] == "llama3"
    names = [safe_open(str(d / "model.safetensors"), "pt").keys() for d in (src, out)]
    assert sorted(names[1]) == sorted(names[0])  # biases included, under their HF names
    ids = torch.randint(3, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (saved(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    assert load_checkpoint(out).args == ck.args
    assert fingerprint(out)["args"] == fingerprint(src)["args"]
    assert ModelArgs.from_hf_config(ck.args.to_hf_config()) == ck.args


_ARGS = ModelArgs(vocab_size=120, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)


@pytest.mark.parametrize("arch, changes, message", [
    ("MistralForCausalLM", dict(qkv_bias=True, o_bias=True), "save it as LlamaForCausalLM"),
    ("Qwen2ForCausalLM", {}, "q/k/v=False, o=False, mlp=False: .* save it as LlamaForCausalLM or Mistral"),
    ("LlamaForCausalLM", dict(qkv_bias=True), "save it as Qwen2ForCausalLM"),
    ("LlamaForCausalLM", dict(o_bias=True), "no supported architecture has it"),
    ("LlamaForCausalLM", dict(sliding_window=32), "sliding window 32"),
])
def test_save_refuses_what_the_architecture_cannot_express(tmp_path, arch, changes, message):
    from dataclasses import replace

    args = replace(_ARGS, architecture=arch, **changes)
    with pytest.raises(M3Error, match=message):
        save_checkpoint(Transformer(args), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refusals: every unsupported configuration names what is unsupported ---

def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture ['GPT2LMHeadModel']"),
    (dict(architectures=["LlamaForCausalLM", "MistralForCausalLM"]), "unsupported architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "unsupported rope scaling type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "unsupported rope scaling type 'linear'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), "llama3 rope scaling lacks"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_config_refused(tmp_path, changes, message):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _edit_config(tmp_path, **changes)
    with pytest.raises(M3Error, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("changes, message", [
    # each was a traceback (or a 40 GB allocation, or a silent misreading) before any check
    (dict(head_dim=10_000_000_000), "head_dim = 10000000000: a size is a whole number"),
    (dict(hidden_size=64.0), "hidden_size = 64.0"),
    (dict(intermediate_size=-5), "intermediate_size = -5"),
    (dict(num_hidden_layers=1_000_000_000), "num_hidden_layers = 1000000000"),
    (dict(head_dim=15, num_attention_heads=4), "head_dim = 15: RoPE rotates pairs"),
    (dict(head_dim=None, hidden_size=60, num_attention_heads=4, num_key_value_heads=2),
     "hidden_size 60 / num_attention_heads 4 gives no even whole head dim"),
    (dict(rope_parameters=None, rope_scaling="linear"), "rope_scaling 'linear' is not an object"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "abc"}), "has a value of the wrong type"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
     "high_freq_factor 1.0 must exceed low_freq_factor 1.0"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": "8", "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "factor = '8' must be a positive number"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings = 'false' must be true or false"),  # was tied
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps = '1e-6'"),
    (dict(bos_token_id=10**6), "bos_token_id = 1000000 is not a token id"),
])
def test_config_values_that_would_fail_later_are_refused_by_name(tmp_path, changes, message):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    (tmp_path / "tokenizer_config.json").write_text("{}")  # the ids come from config.json
    _edit_config(tmp_path, **changes)
    with pytest.raises(M3Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(tmp_path)


def test_rope_scaling_beside_rope_parameters_reads_as_transformers_reads_it(tmp_path):
    # m3 read rope_parameters first; transformers 5 reads a non-empty rope_scaling (4 knows no other)
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling=llama3,
                 rope_theta=5e5)
    ours = load_checkpoint(tmp_path).args
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert dict(ours.rope_scaling)["rope_type"] == theirs.rope_parameters["rope_type"] == "llama3"
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 5e5


def test_model_safetensors_wins_over_a_stale_shard_index(tmp_path):
    # as transformers loads it: m3 read the index (a model re-saved whole over a sharded one)
    ref = make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    ref.config._attn_implementation = "eager"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    ids = torch.randint(3, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the weights of model.safetensors: transformers' logits
        assert (load_checkpoint(tmp_path).model(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_a_shard_index_names_only_files_beside_it(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {"_shard": "20KB"})
    index = tmp_path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    name = next(iter(doc["weight_map"]))
    for weight_map, message in (({**doc["weight_map"], name: "../other/model.safetensors"}, "not a file beside it"),
                                ({**doc["weight_map"], name: "/etc/passwd"}, "not a file beside it"),
                                ({**doc["weight_map"], name: 5}, "weight_map is not an object"),
                                ([], "weight_map is not an object")):
        index.write_text(json.dumps({**doc, "weight_map": weight_map}))
        with pytest.raises(M3Error, match=message):
            load_checkpoint(tmp_path)
    index.write_text("[]")
    with pytest.raises(M3Error, match="cannot read"):
        load_checkpoint(tmp_path)


def _window_parity(tmp_path, arch, overrides, T):
    """Our logits against transformers' (eager attention, its own window rule) on T tokens."""
    ref = make_checkpoint(tmp_path, arch, overrides)
    ref.config._attn_implementation = "eager"
    model = load_checkpoint(tmp_path).model
    ids = torch.randint(3, SMALL["vocab_size"], (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
    return model


def test_active_sliding_window_shorter_than_sequence_refused(tmp_path):
    model = _window_parity(tmp_path, "MistralForCausalLM", dict(sliding_window=16), 16)  # within the window
    with pytest.raises(M3Error, match="sliding window is 16"):
        model(torch.randint(3, 120, (1, 17)))


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    # inactive: no refusal, and full attention over all 20 tokens, as transformers computes them
    _window_parity(tmp_path, "Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=False), 20)


def _rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})


def test_fused_qkv_refused(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})

    def fuse(sd):
        p = "model.layers.0.self_attn."
        sd[p + "qkv_proj.weight"] = torch.cat([sd.pop(p + n + "_proj.weight") for n in "qkv"])
        return sd

    _rewrite_weights(tmp_path, fuse)
    with pytest.raises(M3Error, match="fused QKV projection 'model.layers.0.self_attn.qkv_proj.weight'"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_tensors_named(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _rewrite_weights(tmp_path, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(M3Error, match=r"lacks tensor\(s\) layers.1.feed_forward.w3.weight"):
        load_checkpoint(tmp_path)
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _rewrite_weights(tmp_path, lambda sd: {**sd, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(M3Error, match=r"unexpected tensor\(s\) in checkpoint: model.layers.0.extra.weight"):
        load_checkpoint(tmp_path)
    # tensors the config does not make, of names the runtime maps: an AttributeError traceback before
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _edit_config(tmp_path, num_hidden_layers=1)  # a config cut to fewer layers than the weights
    with pytest.raises(M3Error, match=r"tensor model.layers.1.* is not part of the model config.json makes"):
        load_checkpoint(tmp_path)
    make_checkpoint(tmp_path, "Qwen2ForCausalLM", {})
    _edit_config(tmp_path, architectures=["LlamaForCausalLM"], model_type="llama")  # biases, attention_bias unset
    with pytest.raises(M3Error, match=r"tensor model.layers.0.self_attn.._proj.bias .* is not part of the model"):
        load_checkpoint(tmp_path)
    # integer tensors were converted silently; a tensor in two shards was last-wins
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _rewrite_weights(tmp_path, lambda sd: {k: (v.to(torch.int8) if "layers.0.mlp.up_proj" in k else v) for k, v in sd.items()})
    with pytest.raises(M3Error, match="is I8, not floating point"):
        load_checkpoint(tmp_path)
    sharded = tmp_path / "sharded"
    make_checkpoint(sharded, "LlamaForCausalLM", {"_shard": "20KB"})
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    from safetensors.torch import load_file, save_file
    first, second = load_file(sharded / shards[0]), load_file(sharded / shards[1])
    name = next(iter(first))
    save_file({**second, name: first[name]}, sharded / shards[1], metadata={"format": "pt"})
    with pytest.raises(M3Error, match=f"tensor {name} is in both"):
        load_checkpoint(sharded)


def test_shape_mismatch_and_missing_files(tmp_path):
    make_checkpoint(tmp_path, "LlamaForCausalLM", {})
    _edit_config(tmp_path, intermediate_size=100)
    with pytest.raises(M3Error, match="has shape"):
        load_checkpoint(tmp_path)
    with pytest.raises(M3Error, match="is not a directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(M3Error, match="no model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(M3Error, match="cannot read weights"):
        load_checkpoint(tmp_path)


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    make_checkpoint(tmp_path, "Qwen2ForCausalLM", {})
    from m3compile.model import KVCache

    model = load_checkpoint(tmp_path).model
    ids = torch.randint(3, 120, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        parts = [model(ids[:, :17], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(17, 30)]
    assert cache.length == 30 and cache.next_pos.tolist() == [30, 30]
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-5


def test_mistral_config_without_sliding_window_reads_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(**SMALL).to_dict()
    expected = transformers.MistralConfig(**SMALL).sliding_window  # transformers' own default
    del cfg["sliding_window"]
    assert expected is not None
    assert ModelArgs.from_hf_config({**cfg, "architectures": ["MistralForCausalLM"]}).sliding_window == expected
    cfg["sliding_window"] = None  # an explicit null is full attention
    assert ModelArgs.from_hf_config({**cfg, "architectures": ["MistralForCausalLM"]}).sliding_window is None


def test_weight_digests_are_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """fingerprint hashes a large weight file once per machine (checkpoint.sha256_weights): the digest
    is reused while (device, inode, size, mtime, ctime) are unchanged, and recomputed when the
    bytes change even with the same size and the mtime set back, or when the cache is damaged."""
    import os

    import m3compile.checkpoint as checkpoint

    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "HASH_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "HASH_CACHE_RACY_NS", 0)  # the file is seconds old here
    f = tmp_path / "checkpoint.safetensors"
    f.write_bytes(b"a" * 4096)
    first = checkpoint.sha256_weights(f)
    assert first == checkpoint.sha256_file(f) and checkpoint.hash_cache_file().is_file()
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p, *a: pytest.fail(f"{p} hashed again"))
    assert checkpoint.sha256_weights(f) == first  # remembered: the file is not read
    monkeypatch.setattr(checkpoint, "sha256_file", real)
    st = os.stat(f)
    f.write_bytes(b"b" * 4096)  # same size; the mtime is set back below, the ctime cannot be
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checkpoint.sha256_weights(f) == real(f) != first
    checkpoint.hash_cache_file().write_text("{not json")  # a damaged cache is ignored and rewritten
    assert checkpoint.sha256_weights(f) == real(f)
    monkeypatch.setenv("M3_HASH_CACHE", "0")
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p, *a: "off")
    assert checkpoint.sha256_weights(f) == "off"  # M3_HASH_CACHE=0 hashes every time
    monkeypatch.delenv("M3_HASH_CACHE")
    monkeypatch.setattr(checkpoint, "sha256_file", real)
    monkeypatch.setattr(checkpoint, "HASH_CACHE_RACY_NS", 10**12)
    g = tmp_path / "fresh.safetensors"
    g.write_bytes(b"c" * 4096)
    checkpoint.sha256_weights(g)
    assert str(g.resolve()) not in json.loads(checkpoint.hash_cache_file().read_text())  # too recent to trust


_HEAP_CHURN = """
import ctypes, resource, sys
from m3compile.model import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20
def churn():  # two 24 MiB blocks written and freed, as a forward's activations are
    blocks = [libc.malloc(size) for _ in range(2)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    """After keep_freed_memory (load_checkpoint calls it) freed blocks of megabytes are reused
    as they are; with glibc's defaults the heap's top is given back and faulted in again."""
    import subprocess

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_CHURN, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = 5 * 2 * (24 << 20) // 4096
    default, kept = faults("default"), faults("kept")
    if default < pages // 2:
        pytest.skip(f"this libc reuses freed blocks by default ({default} page faults for {pages} pages)")
    assert kept < pages // 50, (kept, default)


@pytest.mark.parametrize("dtype, units", [(getattr(torch, d), u) for d, u in BF16_PATHS])
def test_a_memory_is_the_same_bits_in_any_batch_at_llama_widths(monkeypatch, dtype, units):
    """The same at the widths of real models, where BLAS does change a row's bits with the row
    count: on a CPU with AMX (torch 2.13) a bf16 row of a 768-wide projection and a float32 row
    of a 2048-wide one came out different at 16-1024 rows than at 2048, and kbs of the 110M shape
    changed with --batch-size until every matmul ran on whole ROW_BLOCK-row blocks. References
    alone, in batches of other sizes and peers, and in a batch of more tokens than one block
    (two blocks) get the same bits (CPUs whose BLAS never varies pass either way)."""
    from m3compile.encode import encode_batch

    _bf16_units(monkeypatch, units)
    args = ModelArgs(vocab_size=300, dim=768, n_layers=2, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048)
    model = Transformer(args).init_weights(seed=0).to(dtype).eval()
    g = torch.Generator().manual_seed(3)
    width, prefix = 128, [1, 50, 60]
    refs = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(90, width + 1, (24,), generator=g)]
    assert sum(map(len, refs)) > PackedRows.ROW_BLOCK  # the whole batch packs into two blocks

    def kv(batch):
        with torch.inference_mode():
            enc = encode_batch(model, batch, prefix, [0, 1], pad_to=width)
        return [[t[b, :, :len(r)] for layer in (0, 1) for t in enc.kv[layer]] for b, r in enumerate(batch)]

    whole = kv(refs)
    for idx in ([3], [0, 5, 10, 15], list(range(8)), list(range(1, 24, 2))):
        for got, i in zip(kv([refs[i] for i in idx]), idx):
            assert all(torch.equal(a, b) for a, b in zip(got, whole[i])), (idx, i)
