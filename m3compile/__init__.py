"""m3compile: compile a corpus into Memory³ explicit memories (arXiv 2407.01178).

Sparse, quantized attention key-values for Llama-family models, in self-describing files.

The public API (what the README shows; training is `m3compile.train.train` with TrainConfig: the
name `train` here is its module's):

    from m3compile import CompileConfig, compile_kb, generate_text, open_kb, repair_kb, verify_kb
    compile_kb(CompileConfig(corpus="docs/"), "kb/")
    kb = open_kb("kb/")
    kb.retrieve("river trade", k=3)
    generate_text("Who founded Brerrdale?", kb="kb/").text
"""

__version__ = "0.2.0.dev0"

# name -> defining module; imported on first use, so `import m3compile` stays light and the
# submodules (which import __version__ from here) cannot form an import cycle
_EXPORTS = {
    "M3Error": "m3compile.errors",
    "CompileConfig": "m3compile.config",
    "PRESETS": "m3compile.config",
    "compile_kb": "m3compile.pipeline",
    "repair_kb": "m3compile.pipeline",
    "check_kb": "m3compile.pipeline",
    "CompileResult": "m3compile.pipeline",
    "open_kb": "m3compile.kb",
    "KnowledgeBase": "m3compile.kb",
    "Memory": "m3compile.kb",
    "load_kb_model": "m3compile.kb",
    "Manifest": "m3compile.manifest",
    "read_manifest": "m3compile.manifest",
    "MemorySpec": "m3compile.spec",
    "memorize": "m3compile.spec",
    "Retriever": "m3compile.retrieve",
    "Hit": "m3compile.retrieve",
    "generate_text": "m3compile.generation",
    "GenerationResult": "m3compile.generation",
    "verify_kb": "m3compile.verify",
    "compact_kb": "m3compile.compact",
    "load_checkpoint": "m3compile.model",
    "TrainConfig": "m3compile.config",
    "KeySearch": "m3compile.keysearch",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm3compile' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
