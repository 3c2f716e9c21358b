"""Shared data access for the benchmarks: ../shared/data beside the repository."""

import os
import sys
from pathlib import Path

from m3compile.llama2c import ensure_converted

# the tests' variable too (tests/conftest.py), so a test runs a benchmark on the data it checked for
DATA = Path(os.environ.get("M3_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or one error line naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is not installed, so no plot was drawn (the table and any --json were written); "
                 "pip install 'm3compile[plot]' (or matplotlib) and run again")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tinystories(n: int) -> list[str]:
    text = (DATA / "tinystories-val" / "tinystories_val_first1000.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:n]


def stories260k(work: Path) -> Path:
    """stories260K converted to a Hugging Face directory under `work`; exits if the data is absent."""
    if not (DATA / "stories260k").is_dir():
        sys.exit(f"{DATA} lacks stories260k: this benchmark needs ../shared/data")
    return ensure_converted(DATA, work)
