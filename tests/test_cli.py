"""The `m3` CLI through Typer's CliRunner: compile/inspect flows and one clear line for bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_checkpoint, run_cli
from m3compile.cli import app
from m3compile.config import (MODEL_MEMORY_FILE, default_model_dir, model_min_relative_score, read_model_memory,
                              write_model_memory)

pytest.importorskip("transformers", reason="transformers builds the tiny test checkpoints")
runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    make_checkpoint(tmp_path / "model", "LlamaForCausalLM", {})
    return tmp_path / "model"


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("w3 w4 w5 w6 w7 w8 w9 w10. w11 w12 w13 w14.")
    (root / "sub" / "b.md").write_text("w20 w21 w22 w23 w24 w25")
    (root / "c.jsonl").write_text(json.dumps({"_id": "x1", "title": "w30", "text": "w31 w32 w33"}) + "\n")
    return root


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_compile_then_inspect(tmp_path, corpus, model_dir):
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--top-k", "3")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "3 documents" in r.stdout
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--top-k", "3")  # nothing to do
    assert r.exit_code == 0 and "wrote" not in r.stdout and f"{tmp_path / 'kb'} is up to date: " in r.stdout, r.stdout
    r = run("inspect", tmp_path / "kb", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["counts"]["documents"] == 3 and info["write"]["top_k"] == 3
    assert info["write"]["memory_layers"] == [0]  # first half of 3 layers
    r = run("inspect", tmp_path / "kb")
    assert r.exit_code == 0 and "memory layers" in r.stdout
    r = run("inspect", tmp_path / "kb", "--ref", 0)
    assert r.exit_code == 0 and "kept tokens" in r.stdout and "w3" in r.stdout
    # the kept positions come from the frame without dequantizing it: those of the memory
    from m3compile.kb import open_kb, reference_detail
    base = open_kb(tmp_path / "kb")
    for ref_id in range(len(base)):
        got = reference_detail(base, ref_id)["kept"]
        mem = base.memory(ref_id)
        assert {layer: [[k["j"] for k in head] for head in heads] for layer, heads in got.items()} == {
            layer: mem.positions[i].tolist() for i, layer in enumerate(mem.layers)}


def test_embedded_example_model(tmp_path):
    if not (default_model_dir() / "config.json").is_file():
        pytest.fail(f"the embedded example model is missing from {default_model_dir()}")
    r = run("compile", Path(__file__).parents[1] / "examples" / "reader" / "corpus", "-o", tmp_path / "kb")
    assert r.exit_code == 0, r.output
    assert "embedded memory reader" in r.stderr
    assert run("inspect", tmp_path / "kb").exit_code == 0


def _trained_model(model_dir, **settings):
    """model_dir as if `m3 train` had written it (formats/model-memory.md)."""
    base = dict(max_tokens=8, boundary="fixed", min_fill=0.75, prefix="w60", top_k=2, memory_layers=[1])
    write_model_memory(model_dir, {**base, **settings}, "test")
    return model_dir


def test_compile_takes_the_settings_a_model_was_trained_to_read(tmp_path, corpus, model_dir):
    _trained_model(model_dir)
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--top-k", "3")
    assert r.exit_code == 0, r.output
    # the file fills the options not given; a given option wins, with a note that the model expects another
    taken, note = (next(l for l in r.stderr.splitlines() if l.startswith(s)) for s in ("using the memory", "note:"))
    assert "--max-tokens 8" in taken and "--top-k" not in taken
    assert "--top-k 2" in note and "this kb uses --top-k 3" in note
    m = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert (m["write"]["max_tokens"], m["write"]["top_k"], m["write"]["memory_layers"]) == (8, 3, [1])
    assert (m["config"]["boundary"], m["write"]["prefix_text"]) == ("fixed", "w60")
    # a rerun with the same command is a no-op (the resolved settings are what the manifest holds)
    assert run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--top-k", "3", "--check").exit_code == 0
    # --preset paper ignores the file, and the compile says the model expects other memories
    r = run("compile", corpus, "-o", tmp_path / "kb-paper", "--model", model_dir, "--preset", "paper")
    assert r.exit_code == 0, r.output
    assert "was trained to read memories compiled with" in r.stderr and "--max-tokens 8" in r.stderr
    m = json.loads((tmp_path / "kb-paper" / "manifest.json").read_text())
    assert (m["write"]["max_tokens"], m["write"]["top_k"], m["write"]["memory_layers"]) == (128, 8, [0])


def test_generation_reads_the_retrieval_floor_its_model_names(tmp_path, corpus, model_dir):
    # formats/model-memory.md `reading`: a retrieved reference scoring under the fraction of a chunk's best is not
    # read; a model without the key reads every retrieved reference (the paper's schedule), an option overrides
    from m3compile.retrieve import Retriever

    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    prompt = "w3 w4 w20 w31"
    hits = Retriever.open(kb).retrieve(prompt, 5)
    assert len(hits) >= 3 and hits[-1].score < 0.9 * hits[0].score  # a floor of 0.9 leaves some out

    def read(*args):
        r = run("generate", prompt, "--kb", kb, "--max-new-tokens", "2", "--json", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["references_read"][0]

    assert model_min_relative_score(model_dir) == 0.0 and read() == [h.ref_id for h in hits]
    _trained_model(model_dir, max_tokens=128, boundary="sentence", prefix="Reference:", top_k=8, memory_layers=[0])
    write_model_memory(model_dir, read_model_memory(model_dir), "test", min_relative_score=0.9)
    assert json.loads((model_dir / MODEL_MEMORY_FILE).read_text())["reading"] == {"min_relative_score": 0.9}
    above = [h.ref_id for h in hits if h.score >= 0.9 * hits[0].score]
    assert read() == above and read("--min-relative-score", "0") == [h.ref_id for h in hits]
    assert read("--min-relative-score", "1") == [h.ref_id for h in hits if h.score >= hits[0].score]
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"id": "q", "text": prompt + " w5 w21"}) + "\n")

    def sparse_nll(*args):  # `m3 eval`'s row with the kb's memories, retrieved with the Eq. 6 filter
        r = run("eval", kb, texts, "--json", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["min_relative_score"], json.loads(r.stdout)["rows"]["sparse"]["nll"]

    floor, nll = sparse_nll()
    assert floor == 0.9 and nll == sparse_nll("--min-relative-score", "0.9")[1]
    assert nll != sparse_nll("--min-relative-score", "0")[1]  # it reads fewer references
    for bad in ('{"min_relative_score": 1.5}', '{"min_relative_score": true}', '0.5'):
        doc = json.loads((model_dir / MODEL_MEMORY_FILE).read_text())
        doc["reading"] = json.loads(bad)
        (model_dir / MODEL_MEMORY_FILE).write_text(json.dumps(doc))
        assert_one_line_error(run("generate", prompt, "--kb", kb, "--max-new-tokens", "2"), MODEL_MEMORY_FILE,
                              "invalid reading setting")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "cannot be read"),
    (json.dumps({"format": "other", "format_version": 1, "settings": {}}), "not an m3-model-memory file"),
    (json.dumps({"format": "m3-model-memory", "format_version": 2, "settings": {}}), "newer than this m3compile"),
    # reported as "newer" before
    (json.dumps({"format": "m3-model-memory", "format_version": 0, "settings": {}}), "which no m3compile writes"),
    (json.dumps({"format": "m3-model-memory", "format_version": "1", "settings": {}}), "which no m3compile writes"),
    (json.dumps({"format": "m3-model-memory", "format_version": 1, "settings": {"top_k": 0}}), "invalid setting"),
    (json.dumps({"format": "m3-model-memory", "format_version": 1, "settings": {"memory_layers": 3}}),
     "memory_layers is 3"),
    (json.dumps({"format": "m3-model-memory", "format_version": 1, "settings": {"prefix": 123}}), "prefix is 123"),
    (json.dumps({"format": "m3-model-memory", "format_version": 1, "settings": {"top_k": "8"}}), "top_k is '8'"),
])
def test_bad_model_memory_file(tmp_path, corpus, model_dir, content, fragment):
    (model_dir / MODEL_MEMORY_FILE).write_text(content)
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir), MODEL_MEMORY_FILE,
                          fragment)
    assert not (tmp_path / "kb" / "manifest.json").exists()


def test_missing_corpus(tmp_path, model_dir):
    assert_one_line_error(run("compile", tmp_path / "nope", "-o", tmp_path / "kb", "--model", model_dir),
                          "does not exist")


@pytest.mark.parametrize("content, reason", [
    (None, "no .txt, .md, .jsonl or .parquet file in it"),
    (b"\x00\x01\x02binary\x00", "1 binary; e.g. bad.txt: "),  # the reason and what the file showed
    ("caf\u00e9 cr\u00e8me".encode("latin-1"), "utf"),
    (b"   \n", "empty"),
])
def test_corpus_without_readable_documents(tmp_path, model_dir, content, reason):
    root = tmp_path / "corpus"
    root.mkdir()
    if content is not None:
        (root / "bad.txt").write_bytes(content)
    r = run("compile", root, "-o", tmp_path / "kb", "--model", model_dir)
    assert_one_line_error(r, "no readable document")
    assert reason in r.stderr.lower()
    assert not (tmp_path / "kb").exists()  # a compile that wrote nothing leaves no empty directory


def test_bad_file_is_skipped_and_reported(tmp_path, corpus, model_dir):
    (corpus / "zz.txt").write_bytes(b"\xff\xfe\x00garbage")
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir)
    assert r.exit_code == 0, r.output
    assert "skipped 1" in r.stderr and "zz.txt" in r.stderr


def test_missing_and_unsupported_model(tmp_path, corpus, model_dir):
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", tmp_path / "none"),
                          "not a directory")
    cfg = json.loads((model_dir / "config.json").read_text())
    for broken, fragment in (({k: v for k, v in cfg.items() if k != "num_attention_heads"},
                              "lacks 'num_attention_heads'"),
                             ([cfg], "holds a JSON list"),
                             ({**cfg, "num_key_value_heads": 3}, "multiple of the key-value heads"),
                             # hidden_size // 0 heads: a ZeroDivisionError traceback
                             ({**{k: v for k, v in cfg.items() if k != "head_dim"}, "num_attention_heads": 0},
                              "num_attention_heads 0")):
        (model_dir / "config.json").write_text(json.dumps(broken))
        assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir), fragment)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    kept = (model_dir / "tokenizer_config.json").read_text()
    (model_dir / "tokenizer_config.json").write_text("[]")  # an AttributeError traceback
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir),
                          "tokenizer_config.json holds a JSON list")
    (model_dir / "tokenizer_config.json").write_text(kept)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir),
                          "unsupported architecture", "GPT2LMHeadModel")


def test_output_is_a_file_or_an_existing_kb(tmp_path, corpus, model_dir):
    (tmp_path / "file").write_text("keep me")
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "file", "--model", model_dir), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "notes", "--model", model_dir), "not part of a knowledge base")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir).exit_code == 0

    def snapshot():
        return {p.relative_to(tmp_path): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in (tmp_path / "kb").rglob("*") if p.is_file() and p.name != "run.json"}

    before = snapshot()
    # the same compile again: nothing to encode, no file touched
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir)
    assert r.exit_code == 0 and "0 encoded" in r.stdout and "3 reused" in r.stdout, r.output
    assert snapshot() == before
    # other memory settings: refused by name, nothing lost
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--top-k", "3"),
                          "different top_k", "--top-k", "--rebuild")
    assert snapshot() == before


@pytest.mark.parametrize("args, fragment", [
    (["--quant", "int3"], "--quant 'int3'"),
    (["--memory-layers", "0-9"], "--memory-layers names layer 9"),
    (["--memory-layers", "a-b"], "is not a list"),
    (["--top-k", "0"], "--top-k 0"),
    (["--preset", "fast"], "unknown preset 'fast'"),
])
def test_bad_options(tmp_path, corpus, model_dir, args, fragment):
    assert_one_line_error(run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, *args), fragment)


def test_inspect_bad_kb(tmp_path, corpus, model_dir):
    assert_one_line_error(run("inspect", tmp_path / "nope"), "is not a directory")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("inspect", tmp_path / "empty"), "no manifest.json")
    assert run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir).exit_code == 0
    m = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run("inspect", tmp_path / "kb"), "format_version 99", "upgrade m3compile")
    m["format_version"] = 1
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run("inspect", tmp_path / "kb", "--ref", 999), "no reference 999")


def test_entry_point_keeps_exit_codes_and_freezes_before_teardown(tmp_path):
    """`m3` and `python -m m3compile` run cli.main: the app, then gc.freeze() before the
    interpreter's teardown. Exit codes and the one-line error must be those of the app."""
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["m3"] == "m3compile.cli:main"
    ok = subprocess.run([sys.executable, "-m", "m3compile", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "compile" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "m3compile", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "is not a directory" in lines[0], bad.stderr
    froze = subprocess.run([sys.executable, "-c", "import gc, sys; from m3compile import cli; sys.argv = ['m3', '--help']\n"
                            "try:\n    cli.main()\nexcept SystemExit as e:\n    print(e.code, gc.get_freeze_count() > 0)"],
                           capture_output=True, text=True)
    assert froze.stdout.strip().splitlines()[-1] == "0 True"


_TORCH_PROBE = ("import sys; from m3compile import cli; sys.argv = ['m3', *sys.argv[1:]]\n"
                "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
                "print('torch' in sys.modules, code)")


def _m3_fresh(*args) -> tuple[str, str]:
    """`m3 ARGS` in a fresh interpreter: ("<torch imported> <exit code>", its stdout and stderr)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _TORCH_PROBE, *map(str, args)], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1], r.stdout + r.stderr


def test_reading_commands_do_not_import_torch(tmp_path, corpus, model_dir):
    """`m3 --help`, `m3 inspect` (`--ref` too: kept positions come from the frame, not dequantized)
    and a BM25 `m3 query` read a kb's manifest, shard headers, references, frames and index only, so
    they must not import torch: its import was ~1.5 s of a ~2 s query."""
    import subprocess
    import sys

    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir, "--top-k", "3").exit_code == 0
    for args in (["--help"], ["inspect", kb], ["query", kb, "w31 w32", "--json"], ["inspect", kb, "--ref", "0"]):
        last, out = _m3_fresh(*args)
        assert last == "False 0", (args, out[-1600:])
    assert "kept tokens" in out
    # a memory is a torch tensor: reading one imports it, and still works
    r = subprocess.run([sys.executable, "-c", "import sys; from m3compile import open_kb; "
                        f"m = open_kb({str(kb)!r}).memory(0); print('torch' in sys.modules, m.keys.ndim)"],
                       capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "True 4", r.stderr[-800:]


def test_a_compile_that_finds_nothing_to_do_imports_no_torch(tmp_path, corpus, model_dir):
    """`m3 compile --check` (CI) and a compile into a kb that is up to date need the model's shape,
    tokenizer and identity, not its weights: they import no torch (~1.1 s of a 1.7 s check on
    SciFact) and load no weights. --check also plans a change without them; the compile that makes
    it loads the model."""
    import shutil

    kb, docs = tmp_path / "kb", tmp_path / "docs"
    shutil.copytree(corpus, docs)
    assert run("compile", docs, "-o", kb, "--model", model_dir, "--top-k", "3").exit_code == 0
    base = ("compile", docs, "-o", kb, "--model", model_dir, "--top-k", "3")
    assert _m3_fresh(*base, "--check")[0] == "False 0"
    last, out = _m3_fresh(*base)
    assert last == "False 0" and "is up to date" in out, out
    (docs / "new.txt").write_text("w40 w41 w42 w43. w44 w45 w46 w47 w48.\n")
    last, out = _m3_fresh(*base, "--check")
    assert last == "False 1" and "documents added: 1" in out, out
    last, out = _m3_fresh(*base)
    assert last == "True 0" and "wrote" in out and "encoded" in out, out


def _main(*args):
    """`python -m m3compile ARGS`: cli.main, whose handling of click's errors CliRunner bypasses."""
    return run_cli(args)


@pytest.mark.parametrize("args, fragment", [
    (["compile", "c", "-o", "kb", "--top-k", "abc"], "Invalid value for '--top-k'"),
    (["compile", "c"], "Missing option '-o'"),
    (["compile", "c", "-o", "kb", "--quantt", "int8"], "No such option: --quantt"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(tmp_path, args, fragment):
    r = _main(*args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("error: ") and fragment in lines[0] and "--help`" in lines[0], lines[0]
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    v = _main("--version")
    assert v.returncode == 0 and v.stdout.startswith("m3compile ")


def test_check_exit_codes_tell_out_of_date_from_an_error(tmp_path, corpus, model_dir):
    """--check: 0 up to date, 1 out of date, 2 an error (as diff and cmp), so CI can tell them apart."""
    kb = tmp_path / "kb"
    r = run("compile", corpus, "-o", kb, "--model", model_dir, "--check")
    assert r.exit_code == 1 and "holds no knowledge base" in r.stdout
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    r = run("compile", corpus, "-o", kb, "--model", model_dir, "--check", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"kb": str(kb), "up_to_date": True, "changes": []}
    (corpus / "a.txt").write_text("w40 w41 w42.")
    r = run("compile", corpus, "-o", kb, "--model", model_dir, "--check", "--json")
    assert r.exit_code == 1 and "documents changed: 1" in json.loads(r.stdout)["changes"]
    for args in (["compile", tmp_path / "nope", "-o", kb], ["compile", corpus, "-o", corpus / "a.txt"]):
        r = run(*args, "--model", model_dir, "--check")
        assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), (args, r.output)
    # with no kb yet, a compile that would fail is an error too, not "out of date": it said 1 to any typo
    new = tmp_path / "new"
    for args, fragment in ((["compile", tmp_path / "nope", "-o", new, "--model", model_dir], "does not exist"),
                           (["compile", corpus, "-o", new, "--model", tmp_path / "nomodel"], "is not a directory"),
                           (["compile", corpus, "-o", new, "--model", model_dir, "--max-tokens", "100000"],
                            "does not fit the model"),
                           (["compile", corpus, "-o", new, "--model", model_dir, "--quant", "vq:HNSW32"],
                            "not a vector codec"),
                           (["compile", corpus, "-o", new, "--model", model_dir, "--index-factory", "HNSW8"],
                            "only --embedder builds"),
                           (["compile", corpus, "-o", kb, "--model", model_dir, "--rebuild"], "nothing to check")):
        r = run(*args, "--check")
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and fragment in lines[0], (args, r.output)
    assert not new.exists()


def test_a_kb_inside_its_corpus_is_not_read_as_text(tmp_path, corpus, model_dir):
    kb = corpus / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    r = run("compile", corpus, "-o", kb, "--model", model_dir, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["summary"]["documents"]["unchanged"] == 3 and out["summary"]["references"]["encoded"] == 0
    assert out["manifest"]["counts"]["skipped"] == {"knowledge-base": 1}  # named, not 38 bad records


def test_growing_a_kb_uses_its_model_and_names_another(tmp_path, corpus, model_dir):
    """Without --model a kb grows with the checkpoint it was compiled with (as generate, eval and
    verify read it); a different one is named by path, not by digests."""
    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    (corpus / "d.txt").write_text("w50 w51 w52 w53.")
    r = run("compile", corpus, "-o", kb)
    assert r.exit_code == 0 and "using the model" in r.stderr and "1 added" in r.stdout, r.output
    make_checkpoint(tmp_path / "other", "LlamaForCausalLM", {}, seed=1)
    assert_one_line_error(run("compile", corpus, "-o", kb, "--model", tmp_path / "other"),
                          "compiled with another model", "--rebuild")
    # so do its quantizer and dtype: a kb compiled with --quant int4 grows as int4 without --quant
    k4 = tmp_path / "kb4"
    assert run("compile", corpus, "-o", k4, "--model", model_dir, "--quant", "int4", "--dtype", "bfloat16").exit_code == 0
    (corpus / "e.txt").write_text("w60 w61 w62.")
    r = run("compile", corpus, "-o", k4, "--json")
    assert r.exit_code == 0 and "using the kb's, int4" in r.stderr and "using the kb's, bfloat16" in r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["documents"]["added"] == 1
    # the shards it did not write are listed as kept, as a no-change compile lists them
    assert summary["shards_kept"] == ["memory-00001.safetensors"] and summary["shards_written"] == ["memory-00002.safetensors"]
    # a setting the compile would refuse is an error under --check too (2), not a change (1)
    r = run("compile", corpus, "-o", k4, "--top-k", "2", "--check")
    assert r.exit_code == 2 and "different top_k" in r.stderr, r.output


def test_bad_values_are_refused_before_work(tmp_path, corpus, model_dir):
    kb = tmp_path / "kb"
    assert_one_line_error(run("compile", corpus, "-o", kb, "--model", model_dir, "--index-factory", "IVF4,Flat"),
                          "--index-factory", "--embedder")
    assert not kb.exists()
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    assert_one_line_error(run("query", kb, "w31", "--max-overlap", "2"), "--max-overlap 2")
    assert_one_line_error(run("generate", "--kb", kb, "w31", "--temperature", "-1"), "--temperature -1")


def test_ctrl_c_says_what_it_left(tmp_path, corpus):
    import subprocess
    import sys

    code = ("import sys; from m3compile import cli, pipeline\n"
            "def stop(*a, **k):\n    raise KeyboardInterrupt\n"
            "pipeline.compile_kb = stop\n"
            f"sys.argv = ['m3', 'compile', {str(corpus)!r}, '-o', {str(tmp_path / 'kb')!r}]\ncli.main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0] and "again" in lines[0], r.stderr


def test_eval_reports_the_lines_it_skipped(tmp_path, corpus, model_dir):
    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"id": "t1", "text": "w3 w4 w5 w6 w7 w8"}) + "\n{broken\n")
    r = run("eval", kb, texts, "--json")
    assert r.exit_code == 0, r.output
    assert "skipped 1 x bad-json" in r.stderr and "texts.jsonl:2" in r.stderr
    assert json.loads(r.stdout)["skipped"] == {"bad-json": 1}  # and in the report a script reads


def test_eval_drops_retrieved_references_that_hold_the_scored_text(tmp_path, corpus, model_dir, monkeypatch):
    # a chunk's own text is its query: scoring a text the kb holds read the reference holding the
    # very tokens being predicted. `m3 eval` now drops references overlapping the chunk by more
    # than 2/3 (paper Eq. 6, as the paper evaluates); --max-overlap 1 keeps them
    from m3compile import evaluate as ev

    from m3compile.kb import open_kb
    from m3compile.retrieve import overlap
    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    text = "w3 w4 w5 w6 w7 w8 w9 w10. w11 w12 w13 w14."  # a.txt
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"id": "t1", "text": text}) + "\n")
    real, got = ev.evaluate, []

    def spy(base, ck, docs, **kw):
        got.append(kw["retrieve"](text, 5))
        return real(base, ck, docs, **kw)

    monkeypatch.setattr(ev, "evaluate", spy)
    rows = {r["ref_id"]: r["token_ids"] for r in open_kb(kb).references().to_pylist()}
    from m3compile.model import load_checkpoint
    query = load_checkpoint(model_dir).tokenizer.encode(text)
    held = {i for i, t in rows.items() if overlap(query, t) > 2 / 3}
    assert held  # the kb holds the text
    for args, keeps in (([], False), (["--max-overlap", "1"], True)):
        r = run("eval", kb, texts, "--json", *args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["max_overlap"] == (1.0 if keeps else 2 / 3)
        assert bool(set(got[-1]) & held) == keeps, (got[-1], held)


def test_keys_mode_refuses_k_0_before_reading_any_memory(tmp_path, corpus, model_dir, monkeypatch):
    # it was refused too, after the model was loaded and every memory of the kb decoded
    from m3compile import keysearch

    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0

    def never(*a, **k):
        raise AssertionError("KeySearch built for -k 0")

    monkeypatch.setattr(keysearch.KeySearch, "__init__", never)
    assert_one_line_error(run("query", kb, "w5", "--mode", "keys", "-k", "0"), "0 references asked for")


def test_a_missing_reference_names_the_ids_there_are(tmp_path, corpus, model_dir):
    """After documents leave and `m3 compact`, ref ids no longer start at 0: the error says which exist."""
    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir, "--max-tokens", "4", "--top-k", "2").exit_code == 0
    (corpus / "a.txt").unlink()
    assert run("compile", corpus, "-o", kb, "--model", model_dir, "--max-tokens", "4", "--top-k", "2").exit_code == 0
    assert run("compact", kb).exit_code == 0
    ids = json.loads(run("inspect", kb, "--json").stdout)["counts"]["references"]
    r = run("inspect", kb, "--ref", 0)
    assert_one_line_error(r, "no reference 0", f"{ids} references, ref ids ")
    first = int(r.stderr.split("ref ids ")[1].split("..")[0])
    assert first > 0 and run("inspect", kb, "--ref", first).exit_code == 0


def test_paths_ids_and_texts_are_printed_as_they_are(tmp_path, model_dir):
    # rich reads `[...]` as markup: an id "[/math]" in a skip note raised MarkupError after the kb
    # was committed, and "[draft] notes.txt" printed as " notes.txt". Printed as text now
    root = tmp_path / "corpus [draft]"
    root.mkdir()
    (root / "[draft] notes.txt").write_text("w3 w4 w5 w6 w7 w8 w9 w10.")
    (root / "r.jsonl").write_text(json.dumps({"id": "[/math]", "text": "w11 w12"}) + "\n"
                                  + json.dumps({"id": "[/math]", "text": "w13 w14"}) + "\n")
    kb = tmp_path / "kb [1]"
    r = run("compile", root, "-o", kb, "--model", model_dir, "--max-tokens", "8", "--top-k", "2")
    assert r.exit_code == 0, r.output
    assert "[/math]" in r.stderr and "duplicate-id" in r.stderr
    r = run("query", kb, "w3 w4", "-k", "1")
    assert r.exit_code == 0 and "[draft] notes.txt" in r.stdout, r.output
    r = run("inspect", kb, "--ref", "0")
    assert r.exit_code == 0 and "[draft] notes.txt" in r.stdout, r.output
    assert_one_line_error(run("inspect", tmp_path / "no [such] kb"), "no [such] kb")


def test_a_preset_that_replaces_a_given_option_says_so(tmp_path, corpus, model_dir):
    # a preset's settings come first (formats/model-memory.md); one that replaces an option given on
    # the command line did so silently
    r = run("compile", corpus, "-o", tmp_path / "kb", "--model", model_dir, "--preset", "paper", "--top-k", "16",
            "--quant", "int4")
    assert r.exit_code == 0, r.output
    assert "note: --preset paper sets --top-k 8, not the 16 given" in r.stderr
    assert "--quant" not in r.stderr.split("note: --preset")[-1]  # the paper preset leaves --quant as given
    r = run("compile", corpus, "-o", tmp_path / "kb2", "--model", model_dir, "--preset", "lossless", "--quant", "int4")
    assert r.exit_code == 0 and "note: --preset lossless sets --quant none, not the int4 given" in r.stderr, r.output


def test_options_the_command_would_ignore_are_one_error(tmp_path, corpus, model_dir):
    """Each combination below was accepted and silently did something else than asked."""
    kb = tmp_path / "kb"
    assert run("compile", corpus, "-o", kb, "--model", model_dir).exit_code == 0
    for args, fragment in (
            (["query", kb, "w1", "--mode", "keys", "--max-overlap", "0.5"], "--mode keys does not apply it"),
            (["query", kb, "w1", "--model", model_dir], "add --mode keys or drop --model"),
            (["generate", "w1", "--mode", "dense", "--model", model_dir], "no --kb is given"),
            (["generate", "w1", "--refs", "3", "--model", model_dir], "--refs 3"),
            (["generate", "w1", "--kb", kb, "--no-memory", "--refs", "3"], "--no-memory reads none"),
            (["generate", "w1", "--kb", kb, "--no-memory", "--mode", "bm25"], "--no-memory retrieves none"),
            (["eval", kb, corpus, "--oracle", "--mode", "bm25"], "--oracle retrieves nothing"),
            (["eval", kb, corpus, "--oracle", "--max-overlap", "0.5"], "--oracle retrieves nothing"),
            (["eval", kb, corpus, "--oracle", "--min-relative-score", "0.5"], "--oracle retrieves nothing"),
            (["generate", "w1", "--min-relative-score", "0.5", "--model", model_dir], "no --kb is given"),
            (["generate", "w1", "--kb", kb, "--no-memory", "--min-relative-score", "0.5"], "--no-memory reads none"),
            (["generate", "w1", "--kb", kb, "--min-relative-score", "1.5"], "must be a fraction in [0, 1]"),
            (["compile", corpus, "-o", kb, "--model", model_dir, "--retrain-codebooks"], "this compile's is --quant int8")):
        assert_one_line_error(run(*args), fragment)
    # and without them, the same commands run
    for args in (["generate", "w1", "--model", model_dir, "--max-new-tokens", "2"],
                 ["generate", "w1", "--kb", kb, "--max-new-tokens", "2", "--refs", "2"],
                 ["query", kb, "w1", "--max-overlap", "0.5"], ["eval", kb, corpus, "--oracle"]):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)


def test_empty_and_undecodable_arguments_are_one_line_before_any_command_runs(tmp_path):
    # `m3 compile "$CORPUS" -o kb` with CORPUS unset compiled the current directory (Path("") is
    # "."), and bytes the terminal could not decode reached the tokenizer or pyarrow as tracebacks
    import os
    import subprocess
    import sys

    def m3(*args):
        argv = [sys.executable, "-m", "m3compile", *args]
        return subprocess.run(argv, capture_output=True, cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "utf-8"})

    for args, fragment in ((["compile", "", "-o", "kb"], b"argument 2 (after compile) is empty"),
                           (["compile", "docs", "-o", "kb", "--preset="], b"the value of --preset is empty"),
                           (["query", "kb", "--mode", ""], b"argument 4 (after --mode) is empty"),
                           (["generate", os.fsdecode(b"The\xff")], b"holds bytes that are not UTF-8")):
        r = m3(*args)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and fragment.decode() in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was compiled, nothing written
    r = m3("compile", "docs", "-o", "kb", "--memory-layers", "0-99999999999")  # expanded, it was a MemoryError
    assert r.returncode == 1 and b"layer 99999999999 is past any model's depth" in r.stderr, r.stderr
    assert b"is empty" not in m3("compile", "docs", "-o", "kb", "--prefix", "").stderr  # an empty prefix may mean one


def test_json_nested_past_the_interpreter_is_one_line(tmp_path, corpus, model_dir):
    # a config.json or manifest.json nested 10^5 deep raised RecursionError out of json.loads
    deep = "[" * 100000 + "]" * 100000
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "manifest.json").write_text(deep)
    r = run_cli(["inspect", tmp_path / "kb"])
    assert r.returncode == 1 and "the manifest is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    import shutil

    shutil.copytree(model_dir, tmp_path / "deep-model")
    (tmp_path / "deep-model" / "config.json").write_text(deep)
    r = run_cli(["generate", "w5", "--model", tmp_path / "deep-model", "--max-new-tokens", "2"])
    assert r.returncode == 1 and "cannot parse" in r.stderr and "Traceback" not in r.stderr, r.stderr
