#!/usr/bin/env bash
# The smoke flow: compile the example corpus with the embedded example model and inspect the KB;
# then the reader example: a memory-trained model answers a question about an article that is
# only in its kb (examples/reader/ask.sh).
# usage: examples/run_example.sh [KB_DIR]        (default: kb/ in the current directory; the
#        reader's kb goes beside it, KB_DIR-reader/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kb="${1:-kb}"
kb="${kb%/}"
m3 compile "$here/corpus" -o "$kb/" && m3 inspect "$kb/"
bash "$here/reader/ask.sh" "$kb-reader"
