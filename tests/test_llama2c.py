"""llama2c.py: stories260K (llama2.c v0) -> HF directory, checked against independent implementations.

Oracles: a pure-Python llama2.c `encode()` and a numpy llama2.c forward pass, both written here from
shared/data/stories260k/SOURCE.md, plus transformers (test-only) reading the converted directory.
"""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from conftest import SHARED_DATA as DATA
from m3compile.errors import M3Error
from m3compile.llama2c import build_tokenizer, convert_llama2c, ensure_converted

SRC = DATA / "stories260k"
STORIES = DATA / "tinystories-val" / "tinystories_val_first1000.txt"
pytestmark = pytest.mark.skipif(
    not (SRC / "stories260K.bin").is_file() or not STORIES.is_file(),
    reason=f"needs {SRC} and {STORIES} (shared data, never copied into the repo)",
)
EDGE = ["", " ", "  two leading, two trailing  ", "\n", "line\n\nbreaks\r\n", "café ☃ 日本",
        "it\u00e2\u20ac\u2122s", "a</s>b<s><unk>", "<0x41>", "tabs\tand\u00a0nbsp", "the theater thethe llll"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return ensure_converted(DATA, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = STORIES.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n<|endoftext|>\n")][:200]


def read_bin_tokenizer() -> tuple[list[str], list[float]]:
    data = (SRC / "tok512.bin").read_bytes()
    off, pieces, scores = 4, [], []
    for _ in range(512):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
        scores.append(score)
        off += 8 + n
    return pieces, scores


def llama2c_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """run.c encode(text, bos=1, eos=0), minus the BOS it adds."""
    lookup = {p: i for i, p in enumerate(pieces)}
    ids = [1] + ([lookup[" "]] if text else [])
    for ch in text:
        ids += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode("utf-8")]

    def pair(i):  # (score, merged id) of ids[i] + ids[i + 1]
        m = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
        return (-math.inf, -1) if m is None else (scores[m], m)

    pairs = [pair(i) for i in range(len(ids) - 1)]
    while pairs and max(pairs)[0] > -math.inf:
        best = max(p[0] for p in pairs)
        i = [p[0] for p in pairs].index(best)  # leftmost: run.c keeps the first strictly-better pair
        ids[i:i + 2] = [pairs[i][1]]
        del pairs[i]
        for j in (i - 1, i):
            if 0 <= j < len(pairs):
                pairs[j] = pair(j)
    assert ids[0] == 1, ids
    return ids[1:]


def test_tokenizer_matches_llama2c_encode(hf_dir, stories):
    pieces, scores = read_bin_tokenizer()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in stories + EDGE:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == llama2c_encode(text, pieces, scores), text[:80]
        assert tok.decode(ids) == text, text[:80]
    assert tok.encode("Once upon a time").ids == [1, 403, 407, 261, 378]  # SOURCE.md's first ids, with BOS
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert [tok.token_to_id(cfg[k]) for k in ("unk_token", "bos_token", "eos_token")] == [0, 1, 2]


def test_conversion_is_deterministic_and_cached(hf_dir, tmp_path):
    again = convert_llama2c(SRC / "stories260K.bin", SRC / "tok512.bin", tmp_path / "again")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (hf_dir / name).read_bytes(), name
    stamp = (hf_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(DATA, hf_dir.parent) == hf_dir
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == stamp


def numpy_llama2c_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Forward pass straight from a v0 .bin, in its own layout (adjacent-pair RoPE), float64."""
    E, F, N, H, KVH, V, S = struct.unpack_from("<7i", path.read_bytes())
    D, shared, V = E // H, V > 0, abs(V)
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    sizes = [("tok", (V, E)), ("rms_att", (N, E)), ("wq", (N, E, E)), ("wk", (N, KVH * D, E)),
             ("wv", (N, KVH * D, E)), ("wo", (N, E, E)), ("rms_ffn", (N, E)), ("w1", (N, F, E)),
             ("w2", (N, E, F)), ("w3", (N, F, E)), ("rms_final", (E,)), ("freq", (2, S, D // 2))]
    w, pos = {}, 0
    for name, shape in sizes + ([] if shared else [("wcls", (V, E))]):
        w[name] = flat[pos:pos + math.prod(shape)].reshape(shape)
        pos += math.prod(shape)
    assert pos == flat.size
    T = len(ids)
    ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)  # (T, D/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x, heads):  # rotate (2i, 2i+1) of every head, as run.c does
        x = x.reshape(T, heads, D // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, heads, D)

    x = w["tok"][ids]  # (T, E)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(N):
        h = norm(x, w["rms_att"][l])
        q, k = rope(h @ w["wq"][l].T, H), rope(h @ w["wk"][l].T, KVH)
        v = (h @ w["wv"][l].T).reshape(T, KVH, D)
        k, v = np.repeat(k, H // KVH, axis=1), np.repeat(v, H // KVH, axis=1)  # head h reads kv head h//2
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        out = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(T, E)
        x = x + out @ w["wo"][l].T
        h = norm(x, w["rms_ffn"][l])
        g = h @ w["w1"][l].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return norm(x, w["rms_final"]) @ (w["tok"] if shared else w["wcls"]).T  # (T, V)


def unshared_copy(tmp_path: Path) -> Path:
    """stories260K as a v0 file with vocab_size -512 and its own (random) classifier appended."""
    data = bytearray((SRC / "stories260K.bin").read_bytes())
    struct.pack_into("<i", data, 20, -512)
    wcls = np.random.default_rng(0).standard_normal((512, 64)).astype("<f4")
    path = tmp_path / "unshared.bin"
    path.write_bytes(bytes(data) + wcls.tobytes())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_weights_match_numpy_llama2c_forward(tmp_path, shared):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")
    src = SRC / "stories260K.bin" if shared else unshared_copy(tmp_path)
    out = convert_llama2c(src, SRC / "tok512.bin", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is shared
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not shared
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = [1, 403, 407, 261, 378, 11, 300, 350, 420, 270, 17, 2, 500, 61, 7, 444, 261]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    want = numpy_llama2c_logits(src, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_converted_model_reproduces_source_figures(hf_dir, stories):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    total, count = 0.0, 0
    with torch.no_grad():
        for story in stories[:100]:
            ids = torch.tensor([tok.encode(story).ids[:512]])  # BOS + story
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        assert count == 32997  # SOURCE.md's count of predicted tokens
        assert abs(total / count - 1.2752) < 0.01, total / count
        seq = [1]
        for _ in range(40):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    text = tok.decode(seq[1:])
    want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert text[:len(want)] == want[:len(text)] and len(text) >= 60, text
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)  # the directory reads like any HF checkpoint
    for s in stories[:5] + EDGE:
        assert auto(s).input_ids == tok.encode(s).ids, s


def test_bad_checkpoint_files_raise_m3error(tmp_path):
    model, toks = (SRC / "stories260K.bin").read_bytes(), (SRC / "tok512.bin").read_bytes()
    cases = {
        "short.bin": (model[:-100], toks, "implies 1056540"),
        "header.bin": (model[:10], toks, "shorter than a llama2.c header"),
        "v1.bin": (struct.pack("<I", 0x616B3432) + model[4:], toks, "version 1/2"),
        "badhead.bin": (struct.pack("<i", 63) + model[4:], toks, "not a valid llama2.c v0 header"),
        "tok_short.bin": (model, toks[:-50], "truncated"),
        "tok_long.bin": (model, toks + b"\0" * 12, "12 bytes after the model's 512 tokens"),
        # one weight NaN, one infinite: garbage out, and `generate` exits 0 on it
        "nan.bin": (model[:-8] + struct.pack("<ff", float("nan"), float("inf")), toks, "2 of its .* weights are NaN or"),
    }
    for name, (m, t, why) in cases.items():
        (tmp_path / "m.bin").write_bytes(m)
        (tmp_path / "t.bin").write_bytes(t)
        with pytest.raises(M3Error, match=why) as err:
            convert_llama2c(tmp_path / "m.bin", tmp_path / "t.bin", tmp_path / "out")
        culprit = "t.bin" if name.startswith("tok") else "m.bin"
        assert str(err.value).startswith(str(tmp_path / culprit)), (name, err.value)
    with pytest.raises(M3Error, match="cannot read"):
        convert_llama2c(tmp_path / "missing.bin", tmp_path / "t.bin", tmp_path / "out")


def test_tokenizers_bpe_cannot_express_are_refused(tmp_path):
    base = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + [" ", "l"]
    # [l, ll, l]: llama2.c merges the left pair, BPE whichever pair ranks first
    with pytest.raises(M3Error, match="overlapping pairs"):
        build_tokenizer(base + ["ll", "lll"], [0.0] * 259 + [-9, -9, -1, -2], tmp_path / "t.bin")
    # equal scores: llama2.c merges the leftmost of " l" and "ll", BPE ranks have no ties
    with pytest.raises(M3Error, match="share a score"):
        build_tokenizer(base + ["ll", " l"], [0.0] * 259 + [-9, -9, -1, -1], tmp_path / "t.bin")
    tok = build_tokenizer(base + ["ll", " l"], [0.0] * 259 + [-9, -9, -1, -2], tmp_path / "t.bin")
    assert tok.encode("lll l", add_special_tokens=False).tokens == ["\u2581", "ll", "l", "\u2581l"]


def test_the_cli_converts_what_model_refuses_to_read(tmp_path, hf_dir):
    """`m3 convert-llama2c` writes the same checkpoint as the library, and `--model` pointed at a
    llama2.c file names the command instead of only "not a directory"."""
    from typer.testing import CliRunner

    from m3compile.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["compile", str(tmp_path), "-o", str(tmp_path / "kb"), "--model", str(SRC / "stories260K.bin")])
    assert r.exit_code == 1 and "m3 convert-llama2c" in r.stderr, r.output
    out = tmp_path / "ckpt"
    r = runner.invoke(app, ["convert-llama2c", str(SRC / "stories260K.bin"), str(SRC / "tok512.bin"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    r = runner.invoke(app, ["convert-llama2c", str(SRC / "stories260K.bin"), str(SRC / "tok512.bin"), "-o", str(out)])
    assert r.exit_code == 1 and "not an empty directory" in r.stderr  # nothing already written is replaced


@pytest.mark.parametrize("fail_at", ["model.safetensors", "tokenizer.json"])
def test_a_conversion_that_fails_to_write_leaves_nothing(tmp_path, monkeypatch, fail_at):
    # the files were written straight into the output directory: a full disk or a Ctrl-C while the
    # weights were saved left a model.safetensors without config.json that the next run refused
    # ("not an empty directory"), and safetensors' and tokenizers' write errors (not OSErrors)
    # were tracebacks. Now they are one error, and no directory or temporary remains
    from typer.testing import CliRunner

    from m3compile import llama2c
    from m3compile.cli import app

    def full(*a, **k):
        raise Exception("No space left on device (os error 28)")

    if fail_at == "model.safetensors":
        monkeypatch.setattr(llama2c, "save_file", full)
    else:
        monkeypatch.setattr(llama2c.Tokenizer, "save", full)
    r = CliRunner().invoke(app, ["convert-llama2c", str(SRC / "stories260K.bin"), str(SRC / "tok512.bin"),
                                 "-o", str(tmp_path / "ckpt")])
    assert r.exit_code == 1 and "cannot write the converted checkpoint" in r.stderr and "No space left" in r.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # an existing empty output (a mount point): its temporary is inside it
    with pytest.raises(M3Error, match="cannot write the converted checkpoint to .*empty: No space left"):
        convert_llama2c(SRC / "stories260K.bin", SRC / "tok512.bin", tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
