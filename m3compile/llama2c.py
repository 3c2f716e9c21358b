"""Convert a llama2.c legacy (v0) checkpoint and its tokenizer.bin into a Hugging Face Llama directory.

Input: llama2.c `export.py --version 0` output (7 x int32 header, then float32 tensors) and llama2.c's
`tokenizer.bin` (int32 max_token_length, then per token: float32 score, int32 length, bytes).
Output: `config.json`, `model.safetensors` (HF names, HF rotate-half q/k layout), `tokenizer.json`
(a SentencePiece-style byte-fallback BPE built with `tokenizers`) and `tokenizer_config.json`.
Reference implementations: llama2.c `run.c` (`read_checkpoint`, `build_tokenizer`, `encode`) and
`export.py`; transformers `convert_llama_weights_to_hf.py` (`permute`) and `LlamaConverter`.

Tokenizer equivalence: llama2.c's `encode` merges, anywhere in the text, the adjacent pair whose
concatenation is the vocab entry with the highest score (leftmost on ties). BPE merges the pair with
the lowest rank (leftmost on ties). Ranking every pair that builds a token by that token's score makes
the two agree, provided merged tokens have distinct scores and no token can be built by two overlapping
pairs (x, y) and (y, z); `_merges` checks both. Known difference: a literal U+2581 `▁` in the text
reads as a space here, while llama2.c byte-encodes it.

Shapes: V vocab, E model dim, F ffn dim, Q = n_heads * D, KV = n_kv_heads * D, D head dim.
"""

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from m3compile.errors import M3Error

_HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c export.py versions 1 and 2 start with this
_SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}  # HF names; the .bin stores "<unk>", "\n<s>\n", "\n</s>\n"
_BIN_SPECIAL = ["<unk>", "\n<s>\n", "\n</s>\n"]
_SPACE = "\u2581"  # SentencePiece's word-boundary mark, which llama2.c's tokenizer.bin replaced by " "


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int  # E, model width
    hidden_dim: int  # F, SwiGLU inner width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA)
    vocab_size: int  # V, always positive here; the file's sign goes to `shared_classifier`
    seq_len: int  # max positions
    shared_classifier: bool  # True when the file's vocab_size was positive (lm head = embedding)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 arrays of a v0 file, in file order (run.c `memory_map_weights`)."""
        E, F, N, V, D = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.head_dim
        KV = self.n_kv_heads * D
        shapes = [("tok", (V, E)), ("rms_att", (N, E)), ("wq", (N, E, E)), ("wk", (N, KV, E)),
                  ("wv", (N, KV, E)), ("wo", (N, E, E)), ("rms_ffn", (N, E)), ("w1", (N, F, E)),
                  ("w2", (N, E, F)), ("w3", (N, F, E)), ("rms_final", (E,)),
                  ("freq_cis", (2, self.seq_len, D // 2))]  # unused: HF recomputes RoPE
        return shapes if self.shared_classifier else shapes + [("wcls", (V, E))]


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise M3Error(f"cannot read {path}: {e.strerror}; check the path") from None


def _read_header(path: Path, data: bytes) -> Llama2cHeader:
    if len(data) < _HEADER.size:
        raise M3Error(f"{path}: {len(data)} bytes is shorter than a llama2.c header; the file is truncated")
    raw = _HEADER.unpack_from(data)
    if raw[0] == _V1_MAGIC:
        raise M3Error(f"{path} is a llama2.c version 1/2 export (magic 'ak42'); only the legacy v0 format "
                      "is supported: re-export it with `export.py --version 0`")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = raw
    ok = (min(dim, hidden, layers, heads, kv_heads, seq_len) > 0 and vocab != 0 and dim % heads == 0
          and (dim // heads) % 2 == 0 and kv_heads <= heads and heads % kv_heads == 0)
    if not ok:
        raise M3Error(f"{path}: header {raw} is not a valid llama2.c v0 header (dim, hidden_dim, n_layers, "
                      "n_heads, n_kv_heads, vocab_size, seq_len); the file is not a llama2.c v0 checkpoint")
    return Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)


def _interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama2.c rotates adjacent pairs (2i, 2i+1) of each head; HF's rotate_half pairs i with i + D/2.
    # moving row 2i+p of a head to row p*D/2 + i (transformers' `permute`) turns one into the other.
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)  # (Q|KV, E)


def read_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read a v0 .bin into HF-named float32 tensors (q/k already in rotate-half layout)."""
    data = _read_bytes(path)
    h = _read_header(path, data)
    shapes = h.tensor_shapes()
    expected = _HEADER.size + 4 * sum(math.prod(s) for _, s in shapes)  # exact: np.prod wraps in int64
    if len(data) != expected:
        raise M3Error(f"{path}: {len(data)} bytes, but its header ({h}) implies {expected}; the file is "
                      "truncated, padded or not a llama2.c v0 export: re-download or re-export it")
    flat = np.frombuffer(data, dtype="<f4", offset=_HEADER.size)
    if not np.isfinite(flat).all():  # a NaN or infinite weight: every output is garbage, and `generate` exits 0
        raise M3Error(f"{path}: {int((~np.isfinite(flat)).sum())} of its {flat.size} weights are NaN or infinite; "
                      "the file is damaged or was exported from a diverged run: re-export it")
    arrays, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        arrays[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    t = {"model.embed_tokens.weight": arrays["tok"], "model.norm.weight": arrays["rms_final"]}  # (V, E), (E,)
    if not h.shared_classifier:
        t["lm_head.weight"] = arrays["wcls"]  # (V, E)
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = _interleaved_to_half(arrays["wq"][i], h.n_heads)  # (Q, E)
        t[p + "self_attn.k_proj.weight"] = _interleaved_to_half(arrays["wk"][i], h.n_kv_heads)  # (KV, E)
        t[p + "self_attn.v_proj.weight"] = arrays["wv"][i]  # (KV, E)
        t[p + "self_attn.o_proj.weight"] = arrays["wo"][i]  # (E, Q)
        t[p + "mlp.gate_proj.weight"] = arrays["w1"][i]  # (F, E)
        t[p + "mlp.up_proj.weight"] = arrays["w3"][i]  # (F, E)
        t[p + "mlp.down_proj.weight"] = arrays["w2"][i]  # (E, F)
        t[p + "input_layernorm.weight"] = arrays["rms_att"][i]  # (E,)
        t[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]  # (E,)
    return h, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def read_tokenizer(path: Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Read llama2.c's tokenizer.bin; it has no vocab size, so the model's decides how many tokens."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise M3Error(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer.bin")
    (max_len,), off = struct.unpack_from("<i", data), 4
    pieces, scores = [], []
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise M3Error(f"{path} ends at token {i} of the model's {vocab_size}: the file is truncated "
                          "or belongs to a model with a smaller vocabulary")
        score, n = struct.unpack_from("<fi", data, off)
        if not 0 <= n <= max_len or off + 8 + n > len(data):
            raise M3Error(f"{path}: token {i} has length {n} (max_token_length {max_len}, "
                          f"{len(data) - off - 8} bytes left); the file is truncated or corrupt")
        try:
            pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise M3Error(f"{path}: token {i} is not valid UTF-8; the file is corrupt") from None
        scores.append(score)
        off += 8 + n
    if off != len(data):
        raise M3Error(f"{path} has {len(data) - off} bytes after the model's {vocab_size} tokens: it belongs "
                      "to a model with a larger vocabulary; pair the checkpoint with its own tokenizer")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < 259 or pieces[:259] != _BIN_SPECIAL + byte_pieces or " " not in pieces:
        raise M3Error(f"{path} is not a SentencePiece byte-fallback tokenizer (ids 0-2 <unk>/<s>/</s>, "
                      "3-258 <0x00>..<0xFF>, a ' ' piece); only Llama-2-style tokenizers are supported")
    return pieces, scores


def _merges(pieces: list[str], scores: list[float], path: Path) -> list[tuple[int, int]]:
    """Every (left, right) id pair llama2.c would merge, ranked by the merged token's score (best first)."""
    ids = {p: i for i, p in enumerate(pieces)}
    found = []  # (merged id, left id, right id)
    for w, piece in enumerate(pieces):
        for k in range(1, len(piece)):
            a, b = ids.get(piece[:k]), ids.get(piece[k:])
            if a is not None and b is not None:
                found.append((w, a, b))
    targets = {w for w, _, _ in found}
    if len({scores[w] for w in targets}) != len(targets):
        raise M3Error(f"{path}: two mergeable tokens share a score, so llama2.c breaks ties by position, "
                      "which BPE merge ranks cannot express; this tokenizer cannot be converted exactly")
    rights = {}  # (merged id, left id) -> right ids
    for w, a, b in found:
        rights.setdefault((w, a), []).append(b)
    for w, a, b in found:
        # [a, b, c] with (a, b) and (b, c) both building w: llama2.c takes the left one, BPE the lower rank
        overlap = any((b, c) != (a, b) for c in rights.get((w, b), []))
        if overlap or {w, a, b} & {1, 2}:
            raise M3Error(f"{path}: token {pieces[w]!r} can be built by overlapping pairs or from <s>/</s>, "
                          "where llama2.c and BPE may disagree; this tokenizer cannot be converted exactly")
    found.sort(key=lambda m: (-scores[m[0]], m))
    return [(a, b) for _, a, b in found]


def build_tokenizer(pieces: list[str], scores: list[float], path: Path) -> Tokenizer:
    """A byte-fallback BPE whose encode(text, add_special_tokens=False) equals llama2.c's encode minus BOS."""
    names = [_SPECIAL.get(i, p.replace(" ", _SPACE)) for i, p in enumerate(pieces)]
    if len(set(names)) != len(names) or any(_SPACE in p for p in pieces):
        raise M3Error(f"{path}: tokens collide once spaces become '{_SPACE}'; the tokenizer is not a "
                      "llama2.c export of a SentencePiece model")
    merges = [(names[a], names[b]) for a, b in _merges(pieces, scores, path)]
    vocab = {n: i for i, n in enumerate(names)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # llama2.c's dummy prefix: one " " before non-empty text (Prepend skips empty text, as llama2.c does)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    # <s>/</s>/<unk> stay plain vocab entries, not added tokens: added tokens would be matched inside
    # the text ("a</s>" -> EOS), which llama2.c never does
    return tok


def convert_llama2c(model_bin: Path, tokenizer_bin: Path, out_dir: Path) -> Path:
    """Convert a llama2.c v0 checkpoint and tokenizer.bin into an HF Llama directory.

    Args:
        model_bin: llama2.c legacy (v0) export, e.g. stories260K.bin.
        tokenizer_bin: the matching llama2.c tokenizer.bin, e.g. tok512.bin.
        out_dir: directory to write (created; existing files of the same names are replaced). The
            files are written beside it first and moved in when all are whole, config.json last:
            a failed or interrupted conversion leaves no partial checkpoint.

    Returns:
        out_dir, holding config.json, model.safetensors, tokenizer.json and tokenizer_config.json.

    Example:
        >>> d = convert_llama2c(Path("stories260K.bin"), Path("tok512.bin"), Path("stories260k-hf"))
        >>> LlamaForCausalLM.from_pretrained(d)  # or m3compile's own loader
    """
    h, tensors = read_checkpoint(Path(model_bin))
    pieces, scores = read_tokenizer(Path(tokenizer_bin), h.vocab_size)
    tok = build_tokenizer(pieces, scores, Path(tokenizer_bin))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h.dim,
        "intermediate_size": h.hidden_dim, "num_hidden_layers": h.n_layers,
        "num_attention_heads": h.n_heads, "num_key_value_heads": h.n_kv_heads, "head_dim": h.head_dim,
        "vocab_size": h.vocab_size, "max_position_embeddings": h.seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": h.shared_classifier, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    tok_config = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "model_max_length": h.seq_len, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "split_special_tokens": True,  # transformers: never read "<s>" in text as BOS (as llama2.c)
    }
    out_dir = Path(out_dir)
    tmp = None
    try:
        # a temporary directory inside an existing output (the same file system, whatever is
        # mounted there), else beside it, renamed into place whole
        exists = out_dir.is_dir()
        if not exists:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".m3-convert-", dir=out_dir if exists else out_dir.parent))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        for name, obj in (("tokenizer_config.json", tok_config), ("config.json", config)):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if not exists:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, out_dir)
        else:  # config.json last: a directory with it holds the whole checkpoint
            for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
                os.replace(tmp / name, out_dir / name)
    except Exception as e:  # OSErrors, and safetensors' and tokenizers' write errors, which are not
        raise M3Error(f"cannot write the converted checkpoint to {out_dir}: {e}; check the path, its "
                      "permissions and free space") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_converted(shared_dir: Path, cache_dir: Path) -> Path:
    """Convert `shared_dir/stories260k` into `cache_dir/stories260k` once; later calls return it as is.

    The directory is written beside its final name and renamed into place, so its presence means it
    is complete, and concurrent callers (pytest-xdist workers) never see half a checkpoint.
    """
    src, dst = Path(shared_dir) / "stories260k", Path(cache_dir) / "stories260k"
    if dst.is_dir():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stories260k-", dir=dst.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the tests
    try:
        convert_llama2c(src / "stories260K.bin", src / "tok512.bin", tmp)
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():  # only a concurrent caller that finished first is expected here
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
