"""The compiled parts of m3compile: vq.TableDecoder's table lookups (m3compile/_lookup.c) and paper
Eq. 6's overlap count (m3compile/_overlap.c), in C.

Everything else is in pyproject.toml. Both extensions are optional: where no C compiler is, the build
goes on without them, vq.py decodes with numpy's `take` (the same floats, ~2x slower) and
retrieve.overlap runs its Python loop (the same numbers, ~11x slower a check)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("m3compile._lookup", ["m3compile/_lookup.c"], optional=True),
                   Extension("m3compile._overlap", ["m3compile/_overlap.c"], optional=True)])
