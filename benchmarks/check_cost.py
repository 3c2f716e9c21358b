"""What `m3 compile --check` costs on an up-to-date kb, against what loading its model costs.

A CI job runs `m3 compile corpus/ -o kb/ --check` on every push. On an up-to-date kb the check
needs the model's shape, tokenizer and identity (config.json, tokenizer.json, the weights' sha256,
remembered per machine while the files are unchanged), never its weights. This benchmark makes a
random-weight Llama shape (default: 0.89B parameters, 16 x 2048, stored in bfloat16 as Hugging Face
checkpoints usually are), compiles ~20 KB of Gutenberg text with it in float32 (the default dtype),
then runs, alternated in fresh processes:

  check       `python -m m3compile compile CORPUS -o KB --model MODEL --check`
  load        `load_checkpoint(MODEL, dtype=float32)`: what the check cost when it loaded the model

and prints each one's wall seconds and peak RSS (os.wait4), and their ratio. ~1 min, 2 GB of disk
under --work (default: a temporary directory). Before 2026-12-06 the check loaded the model: it
cost the load and more.

    python benchmarks/check_cost.py [--dim 2048 --layers 16] [--rounds 3]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run in child processes, so that this one stays small: a child's peak RSS (wait4) counts what its
# parent held when it was forked
BUILD = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from compile_throughput import book_texts, train_tokenizer
from m3compile.model import ModelArgs, Transformer, save_checkpoint
work, dim, layers = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
args = ModelArgs(vocab_size=32000, dim=dim, n_layers=layers, n_heads=dim // 128, n_kv_heads=dim // 256, head_dim=128,
                 hidden_dim=dim * 11 // 4, max_seq_len=2048)
texts = book_texts(0.02)
(work / "corpus").mkdir()
for name, text in texts.items():
    (work / "corpus" / f"{name}.txt").write_text(text)
model = Transformer(args).init_weights(seed=0).to(torch.bfloat16)
save_checkpoint(model, work / "model", bos_id=1, eos_id=2)
train_tokenizer(list(texts.values()), work / "model")
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
      f"{sum(len(t) for t in texts.values()) / 1e3:.0f} KB of text, torch {torch.__version__}")
"""
LOAD = ("import sys, torch; from m3compile.model import load_checkpoint; "
        "load_checkpoint(sys.argv[1], dtype=torch.float32)")


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, output) of one child process, which must succeed."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))} failed (exit {p.returncode}):\n{text[-2000:]}")
    return wall, usage.ru_maxrss / 1024, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, help="where the model, corpus and kb go (default: a temporary directory)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="m3check-", dir=a.work) as tmp:
        work = Path(tmp)
        made = run([sys.executable, "-c", BUILD, str(Path(__file__).parent), str(work), str(a.dim), str(a.layers)])
        m3 = [sys.executable, "-m", "m3compile", "compile", str(work / "corpus"), "-o", str(work / "kb"),
              "--model", str(work / "model"), "--max-tokens", "128"]
        wall, _, _ = run(m3)
        size = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors")) / 1e9
        print(f"model: {made[2].strip().splitlines()[-1]}; bf16 weights {size:.1f} GB; kb compiled in float32 in "
              f"{wall:.1f} s; {os.cpu_count()} CPUs")
        print("| round | check: s | check: peak RSS MB | model load: s | model load: peak RSS MB |\n"
              "|---|---|---|---|---|")
        checks, loads = [], []
        for r in range(a.rounds):
            c = run(m3 + ["--check"])
            assert "is up to date" in c[2], c[2]
            lo = run([sys.executable, "-c", LOAD, str(work / "model")])
            checks.append(c[:2])
            loads.append(lo[:2])
            print(f"| {r + 1} | {c[0]:.2f} | {c[1]:.0f} | {lo[0]:.2f} | {lo[1]:.0f} |", flush=True)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        cs, cr = med([c[0] for c in checks]), med([c[1] for c in checks])
        ls, lr = med([x[0] for x in loads]), med([x[1] for x in loads])
        print(f"median: check {cs:.2f} s, {cr:.0f} MB; the model's load alone {ls:.2f} s, {lr:.0f} MB "
              f"({ls / cs:.1f}x the check's time, {lr / cr:.1f}x its memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
