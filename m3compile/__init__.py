"""m3compile: compile a corpus into Memory³ explicit memories (arXiv 2407.01178).

Sparse, quantized attention key-values for Llama-family models, in self-describing files.
"""

__version__ = "0.1.0"

from m3compile.errors import M3Error  # noqa: E402

__all__ = ["M3Error", "__version__"]
