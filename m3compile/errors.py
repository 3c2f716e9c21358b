"""The one error type for user mistakes (STYLE rule 8).

Asserts are for our bugs. M3Error is for bad input: its message names the thing, says why,
and gives the fix. The CLI turns it into one red stderr line and exit code 1.
"""


# what to do about a damaged kb file (format with kb=the kb directory)
REPAIR_HINT = "run `m3 verify --repair {kb}` (or the same `m3 compile` again) to rebuild it"


class M3Error(Exception):
    """A user-facing error: what is wrong, why, and how to fix it, in one line."""


class damaged_file:
    """`with damaged_file(path, kb_dir): load(path)`: whatever a third-party loader raises on bad
    bytes (bm25s and numpy: ValueError, EOFError; FAISS: RuntimeError; tokenizers: a bare
    Exception) becomes one M3Error naming the file and the repair. Only around loaders of kb files."""

    def __init__(self, path, kb_dir):
        self.path, self.kb_dir = path, kb_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (M3Error, KeyboardInterrupt)) or not isinstance(e, Exception):
            return False
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = REPAIR_HINT.format(kb=self.kb_dir)
        raise M3Error(f"cannot read {self.path} ({why}); the kb is damaged: {hint}") from None
