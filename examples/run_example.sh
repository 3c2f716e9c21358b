#!/usr/bin/env bash
# The smoke flow: compile the example corpus with the embedded example model, then inspect the KB.
# usage: examples/run_example.sh [KB_DIR]        (default: kb/ in the current directory)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kb="${1:-kb}"
m3 compile "$here/corpus" -o "$kb/" && m3 inspect "$kb/"
