#!/usr/bin/env bash
# The smoke flow: compile the example corpus with the embedded model (examples/reader/model, a
# small Llama trained to read memories; none of these 24 articles was in its training) and inspect
# the KB; then the reader example: the same model answers a question about an article that is only
# in its kb, with and without memory (examples/reader/ask.sh).
# usage: examples/run_example.sh [KB_DIR]        (default: kb/ in the current directory; the
#        reader's kb goes beside it, KB_DIR-reader/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kb="${1:-kb}"
kb="${kb%/}"
m3 compile "$here/corpus" -o "$kb/" && m3 inspect "$kb/"
# the embedded model never trained on these articles: the answer comes from the kb
echo "from the demo kb: $(m3 generate "Who founded Brerrdale?" --kb "$kb/" --max-new-tokens 10)"
bash "$here/reader/ask.sh" "$kb-reader"
