"""Shared fixtures: the real third-party data beside the repo, the converted stories260K model,
and tiny random Hugging Face checkpoints made on the spot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("M3_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# Where .ci/run sets M3_STRICT_SKIPS=1, a test may skip only for the want (or presence) of a CUDA
# device: there a missing test dependency (transformers, ray, the MiniLM package), missing shared
# data or an allocator check that skips itself fails the run, instead of quietly skipping the
# suites that need them while CI stays green.
ALLOWED_SKIPS = ("needs a CUDA device", "this machine has CUDA")
_refused_skips: list[str] = []


def _note_skip(report) -> None:
    if os.environ.get("M3_STRICT_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _refused_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _refused_skips:
        print(f"\nM3_STRICT_SKIPS: {len(_refused_skips)} skip(s) for a reason other than CUDA:", file=sys.stderr)
        for line in _refused_skips:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = 1


def shared(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"{p} is absent: this test needs the project's shared data (../shared/data/{name})")
    return p


def tinystories(n: int) -> list[str]:
    text = (shared("tinystories-val") / "tinystories_val_first1000.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    return [s for s in stories if s][:n]


@pytest.fixture(scope="session")
def stories260k(tmp_path_factory) -> Path:
    """stories260K (llama2.c, trained on TinyStories) converted to a Hugging Face directory."""
    from m3compile.llama2c import ensure_converted

    shared("stories260k")
    return ensure_converted(SHARED_DATA, tmp_path_factory.mktemp("models"))


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A real tokenizers WordLevel tokenizer.json with <unk>/<s>/</s> = 0/1/2 and words w3..wN."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=120, max_position_embeddings=256, rms_norm_eps=1e-5)

CHECKPOINT_CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-theta": ("LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama3-rope": ("LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral-head-dim": ("MistralForCausalLM", dict(head_dim=24, sliding_window=4096)),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "llama-sharded": ("LlamaForCausalLM", dict(_shard="40KB")),
}


def make_checkpoint(path, arch, overrides, seed=0):
    """A small random transformers model of `arch`, saved with save_pretrained plus a tokenizer."""
    import torch
    import transformers

    overrides = dict(overrides)
    shard = overrides.pop("_shard", None)
    cls = getattr(transformers, arch)
    config = cls.config_class(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = cls(config).eval()
    # random init leaves biases at zero and norms at one; perturb them so they are tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    write_word_tokenizer(path, SMALL["vocab_size"])
    return model


def oracle(model, ids, mask=None, position_ids=None):
    import torch

    """transformers' logits, pre-RoPE q/k and v projections, and post-RoPE key cache."""
    proj = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            mod = getattr(layer.self_attn, name)
            hooks.append(mod.register_forward_hook(lambda m, a, out, i=i, name=name: proj.__setitem__((i, name), out)))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    for h in hooks:
        h.remove()
    return out.logits, proj, out.past_key_values


def reference_rule(ref_model, prefix, tokens, layers, k):
    """Kept j, post-RoPE keys and values per layer, from transformers alone, reference by reference."""
    import numpy as np
    import torch

    ids = torch.tensor([list(prefix) + list(tokens)])
    _, proj, cache = oracle(ref_model, ids)
    cfg = ref_model.config
    n, h = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    p, T = len(prefix), len(tokens)
    out = []
    for l in layers:
        q = proj[(l, "q_proj")][0, p:].double().numpy().reshape(T, n, d)
        kp = proj[(l, "k_proj")][0, p:].double().numpy().reshape(T, h, d)
        kept = []
        for g in range(h):
            group = range(g * (n // h), (g + 1) * (n // h))
            # the paper's w_j = sum over queries i (and the group's heads) of exp(q_i . k_j / sqrt(d))
            w = [sum(np.exp(q[i, hh] @ kp[j, g] / np.sqrt(d)) for hh in group for i in range(T)) for j in range(T)]
            best = sorted(range(T), key=lambda j: (-w[j], j))[:min(k, T)]
            kept.append(sorted(best))
        kept = np.array(kept)  # (H, K)
        keys = cache.layers[l].keys[0, :, p:]  # (H, T, D)
        values = cache.layers[l].values[0, :, p:]
        idx = torch.from_numpy(kept)[..., None].expand(-1, -1, d)
        out.append((kept, keys.gather(1, idx), values.gather(1, idx)))
    return out


def memory_errors(exact, approx, ref_id: int) -> tuple[float, float]:
    """(||x - x^|| / ||x||, max |x - x^|) of one reference's keys and values together: its memory in
    the kb `approx` against the lossless kb `exact` of the same corpus (references.parquet's
    quant_rel_err and quant_max_err, formats/references.md); the kept positions must agree."""
    import torch

    a, b = exact.memory(ref_id), approx.memory(ref_id)
    assert torch.equal(a.positions, b.positions), ref_id
    x = torch.cat([a.keys.flatten(), a.values.flatten()]).double()
    d = x - torch.cat([b.keys.flatten(), b.values.flatten()]).double()
    return float(d.norm() / x.norm()), float(d.abs().max())


def run_cli(args, env_extra=None, timeout=None) -> subprocess.CompletedProcess:
    """`python -m m3compile ARGS` in a fresh process (a kill, exit codes and stderr as a user meets
    them), with `env_extra` added to the environment."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "m3compile", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def words(seed: int, n: int) -> str:
    """A sentence of n words of the tiny checkpoints' word vocabulary (w3..w119), seeded."""
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, 120)}" for _ in range(n)) + "."


def model_and_corpus(root: Path, sizes) -> Path:
    """A tiny random Llama in root/model and root/corpus/doc{i}.txt of sizes[i] seeded words; returns the corpus."""
    make_checkpoint(root / "model", "LlamaForCausalLM", {})
    corpus = root / "corpus"
    corpus.mkdir()
    for i, n in enumerate(sizes):
        (corpus / f"doc{i}.txt").write_text(words(i, n))
    return corpus


def check_lazy_engine(frames_of, ahead: int, n_batches: int = 12) -> None:
    """An engine of distribute.py that encodes on workers (`frames_of(model_path, spec, batches)`)
    takes its batches lazily, `ahead` of them pulled when the first frames come back (its queue,
    refilled once), and yields the frames the local engine makes, in order. The embedded model."""
    from m3compile import distribute
    from m3compile.config import CompileConfig, default_model_dir
    from m3compile.checkpoint import fingerprint
    from m3compile.model import load_checkpoint
    from m3compile.spec import MemorySpec

    path = default_model_dir()
    config, _ = CompileConfig(corpus=".").resolved(path)
    ck = load_checkpoint(path)
    spec = MemorySpec.from_config(config, ck, fingerprint(path))
    batches = [[[5 + (7 * b + 3 * r + t) % 900 for t in range(1 + (b * r) % spec.width)] for r in range(3)]
               for b in range(n_batches)]
    pulled = []

    def lazily():
        for b in batches:
            pulled.append(len(pulled))
            yield b

    frames = frames_of(path, spec, lazily())
    got = [next(frames)]
    assert len(pulled) == ahead + 1  # the queue, refilled once before the first yield
    got.extend(frames)
    assert len(pulled) == len(batches)
    assert got == list(distribute.local_frames(ck.model, spec, batches))
