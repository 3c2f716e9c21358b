"""The one compiled part of m3compile: vq.TableDecoder's table lookups in C (m3compile/_lookup.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is, the build
goes on without it and vq.py decodes with numpy's `take` (the same floats, ~2x slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("m3compile._lookup", ["m3compile/_lookup.c"], optional=True)])
