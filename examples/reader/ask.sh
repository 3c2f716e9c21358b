#!/usr/bin/env bash
# The reader example: compile the held-out articles (never in any training text) with the
# memory-trained model, then ask a question about one of them with and without its memories.
# usage: examples/reader/ask.sh [KB_DIR] [QUESTION]     (default: kb-reader/ in the current directory)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kb="${1:-kb-reader}"
question="${2:-Who founded Yimmoor?}"
# the memory settings come from the model: it was trained to read 32-token references, top-16, in
# layers 0-3, and model/m3-memory.json says so (formats/model-memory.md)
m3 compile "$here/corpus" -o "$kb/" --model "$here/model"
echo "with memory:    $(m3 generate "$question" --kb "$kb/" --max-new-tokens 10)"
echo "without memory: $(m3 generate "$question" --kb "$kb/" --max-new-tokens 10 --no-memory)"
