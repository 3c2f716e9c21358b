#!/usr/bin/env bash
# The sparse reader's recipe (examples/README.md, "The density frontier"), one command:
#   bash examples/train_sparse_reader.sh WORK_DIR
# Eleven continuations of the 1/2 reader (trained at 1/2 of a reference's key-values), each a
# benchmarks/train_memory.py run (it prints held-out fact accuracy before and after):
#   d16b  its own 2000-article world, top-4 of 32 tokens in layers 2-3 (1/16), 3000 steps
#   d16w  a fresh 8000-article world (seed 1), same memory, 2000 steps at lr 1e-3
#   d16y  another fresh 8000-article world (seed 2), top-8 in layer 3 alone (1/16), 1500 steps
#   d16z  a third fresh world (seed 3), top-8 in layer 3, 2700 steps (no gain at 1/16 by itself)
#   d32a  a fourth fresh world (seed 4), top-4 in layer 3 alone (1/32), 1900 steps
#   d32r  a fresh world (seed 6; seed 5 was a step left out), the same memory, four more phrasings of every question
#         (--more-forms), and the first world's memory-only and known entities' texts replayed
#         (--replay-world 0: never its held-out articles), 1900 steps
#   d32s  the same on another fresh world (seed 7), 1900 steps
#   d5e   a fresh world (seed 14) at the reading density, top-5 of layer 3 (5/128), four composed
#         phrasings of every question besides (--composed-forms 4: held-out forms), 1900 steps at lr 5e-4
#   d5r   a fresh world (seed 15), the same without composed phrasings (re-anchors the templates),
#         800 steps at lr 2.5e-4
#   d5m   not a step: the mean of d32s's and d5r's weights (the default before d7m), d7f's start
#   d7f   a fresh world (seed 19), from d5m, two composed and four free phrasings of every question
#         (--free-forms 4: examples/free_forms.json, written blind to every other phrasing), 1900
#         steps at lr 5e-4
#   d7r   a fresh world (seed 20), d5r's re-anchoring step after d7f, 800 steps at lr 2.5e-4
# ~5.3 h to d32a on one core of a 2-core machine with AMX, ~4.5 h on one AVX2 core in float32 (torch
# threads 1); d32r and d32s took 57 min each on two threads of an AVX512-BF16 machine. Those times
# are from before 2026-12-07, when m3 train shuffled an epoch's order for every sequence of every
# step and the retrieval's Eq. 6 filter ran in Python: a step of d32s's size on an 8000-article
# world now trains in 12.5 min on two AVX2 cores, 22 min with its retrieval and evaluations
# (d5e: 21.6 min, d5r: 11.0 min, d7f ~22 min, d7r ~11 min, two threads of a 2-core AVX2 AMD EPYC,
# 2026-12-07; those four steps run on two threads, as they were trained: other thread counts give
# other bits).
# Bits: m3 train trains in bf16 autocast where the CPU has native bf16 (AVX512-BF16, AMX) and in
# float32 elsewhere, and the thread count changes float sums, so a rerun gives the committed weights
# only step by step on the CPU kind and threads each step had (d32r, d32s: bf16, an AVX512-BF16 CPU,
# two threads, where this script now gives one; d5e, d5r, d7f, d7r: float32, AVX2, two); elsewhere expect
# close figures, not the same bytes.
# The result, d7m, is the mean of d5m's and d7r's weights (every tensor; examples/README.md, "Free
# phrasings: d7f, d7r and d7m"), read at 5 tokens of layer 3 (5/128), 8 (1/16) or 4 (1/32), exported with
# its m3-memory.json at 5 of layer 3 as WORK_DIR/reader/model (examples/export_sparse_reader.py;
# `--out examples/reader` makes it the embedded default, which is how the committed one was made).
# Measure it with
#   python benchmarks/density_frontier.py --kb world --known 1852 --point WORK_DIR/reader/model:5:3 WORK_DIR/reader/model:8:3
#   python benchmarks/question_forms.py --kb world --model WORK_DIR/reader/model
set -euo pipefail
work=${1:?usage: bash examples/train_sparse_reader.sh WORK_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A step whose result (WORK_DIR/NAME.json) is there is skipped; a killed step resumes from the state
# its training leaves every 200 steps (train_memory.py --resume), so the recipe can span sessions.
run() {
    local name=$1; shift
    if [[ -f "$work/$name.json" && -f "$work/$name/trained/config.json" ]]; then
        echo "$name: done ($work/$name.json), skipped" >&2; return
    fi
    python "$here/benchmarks/train_memory.py" --threads 1 --work "$work/$name" --json "$work/$name.json" "$@"
}
run d16b --start-from "$here/examples/reader-half/model" --top-k 4 --memory-layers 2,3 \
    --steps 3000
run d16w --start-from "$work/d16b/trained" --entities 8000 --world-seed 1 --top-k 4 \
    --memory-layers 2,3 --steps 2000 --lr 1e-3
run d16y --start-from "$work/d16w/trained" --entities 8000 --world-seed 2 --top-k 8 \
    --memory-layers 3 --steps 1500 --lr 1e-3
run d16z --start-from "$work/d16y/trained" --entities 8000 --world-seed 3 --top-k 8 \
    --memory-layers 3 --steps 2700 --lr 1e-3
run d32a --start-from "$work/d16z/trained" --entities 8000 --world-seed 4 --top-k 4 \
    --memory-layers 3 --steps 1900 --lr 1e-3
run d32r --start-from "$work/d32a/trained" --entities 8000 --world-seed 6 --top-k 4 \
    --memory-layers 3 --steps 1900 --lr 1e-3 --more-forms --replay-world 0
run d32s --start-from "$work/d32r/trained" --entities 8000 --world-seed 7 --top-k 4 \
    --memory-layers 3 --steps 1900 --lr 1e-3 --more-forms --replay-world 0
run d5e --start-from "$work/d32s/trained" --threads 2 --entities 8000 --world-seed 14 --top-k 5 \
    --memory-layers 3 --steps 1900 --lr 5e-4 --more-forms --composed-forms 4 --replay-world 0
run d5r --start-from "$work/d5e/trained" --threads 2 --entities 8000 --world-seed 15 --top-k 5 \
    --memory-layers 3 --steps 800 --lr 2.5e-4 --more-forms --replay-world 0
[[ -f "$work/d5m/trained/model.safetensors" ]] || python "$here/examples/export_sparse_reader.py" "$work" --soup d5m
run d7f --start-from "$work/d5m/trained" --threads 2 --entities 8000 --world-seed 19 --top-k 5 \
    --memory-layers 3 --steps 1900 --lr 5e-4 --more-forms --composed-forms 2 --free-forms 4 --replay-world 0
run d7r --start-from "$work/d7f/trained" --threads 2 --entities 8000 --world-seed 20 --top-k 5 \
    --memory-layers 3 --steps 800 --lr 2.5e-4 --more-forms --replay-world 0
python "$here/examples/export_sparse_reader.py" "$work" --out "$work/reader"
