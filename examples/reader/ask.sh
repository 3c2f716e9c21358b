#!/usr/bin/env bash
# The reader example: compile the held-out articles (never in any training text) with the
# memory-trained model, then ask a question about one of them with and without its memories.
# usage: examples/reader/ask.sh [KB_DIR] [QUESTION]     (default: kb-reader/ in the current directory)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kb="${1:-kb-reader}"
question="${2:-Who founded Yimmoor?}"
# the memory settings come from the model: it reads 32-token references, top-5, in layer 3 alone
# (5/128 of each reference's key-values), and model/m3-memory.json says so (formats/model-memory.md).
# The 1/2 reader it was trained from: --model "$here/../reader-half/model" (top-16, layers 0-3)
m3 compile "$here/corpus" -o "$kb/" --model "$here/model"
echo "with memory:    $(m3 generate "$question" --kb "$kb/" --max-new-tokens 10)"
echo "without memory: $(m3 generate "$question" --kb "$kb/" --max-new-tokens 10 --no-memory)"
