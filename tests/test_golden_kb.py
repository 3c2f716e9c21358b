"""Golden bytes of the worked example in formats/manifest.md and formats/references.md.

A tiny Llama (made here from a seed, no download) compiles a two-document corpus; the manifest,
shard index and references table must equal tests/data/kb-example/ byte for byte. A deliberate
format change regenerates them: M3_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_kb.py
"""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_word_tokenizer
from m3compile.config import CompileConfig
from m3compile.model import ModelArgs, Transformer, save_checkpoint
from m3compile.pipeline import compile_kb

GOLDEN = Path(__file__).parent / "data" / "kb-example"
FILES = ("manifest.json", "memory-00001.safetensors", "memory.safetensors.index.json", "references.parquet")


def kb_file(kb: Path, name: str) -> Path:
    """Top-level files by name; the generation's files through the manifest."""
    gen = json.loads((kb / "manifest.json").read_text())["generation"]
    return kb / name if (kb / name).exists() else kb / gen / name
DOCS = {"a.txt": "w3 w4 w5 w6 w7 w8. w9 w10 w11 w12.", "b.txt": "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30 w31"}


def build_example(root: Path) -> Path:
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)
    save_checkpoint(Transformer(args).init_weights(seed=0), root / "model", bos_id=1, eos_id=2)
    write_word_tokenizer(root / "model", 64)
    (root / "corpus").mkdir()
    for name, text in DOCS.items():
        (root / "corpus" / name).write_text(text)
    cwd = os.getcwd()
    os.chdir(root)  # relative paths, as a user types them, so the manifest does not name tmp_path
    try:
        compile_kb(CompileConfig(corpus="corpus", model="model", max_tokens=8, top_k=3, quant="int8",
                                 prefix="w60"), "kb")
    finally:
        os.chdir(cwd)
    return root / "kb"


def test_golden_kb(tmp_path):
    kb = build_example(tmp_path)
    if os.environ.get("M3_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            (GOLDEN / name).write_bytes(kb_file(kb, name).read_bytes())
        rows = pq.read_table(kb_file(kb, "references.parquet")).to_pylist()
        (GOLDEN / "references.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        # compared with what was just written, the test would pass whatever changed: it skips
        # (which CI's M3_STRICT_SKIPS fails), and the diff is reviewed
        pytest.skip("golden kb files regenerated (M3_UPDATE_GOLDEN=1): review `git diff tests/data`")
    for name in FILES:
        assert kb_file(kb, name).read_bytes() == (GOLDEN / name).read_bytes(), f"{name} differs from the golden"
    rows = pq.read_table(kb_file(kb, "references.parquet")).to_pylist()
    assert rows == json.loads((GOLDEN / "references.json").read_text())
