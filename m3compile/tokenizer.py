"""The model's tokenizer, read from a checkpoint's `tokenizer.json` through the `tokenizers` library.

BOS/EOS come from `tokenizer_config.json` (token strings) and fall back to `config.json`
(`bos_token_id`/`eos_token_id`), the way Hugging Face resolves them. Text is always encoded
without special tokens: callers add BOS themselves where the paper's layout puts it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from m3compile.errors import M3Error


def _token_content(value) -> str | None:
    # tokenizer_config.json stores a special token as a string or as an AddedToken dict
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise M3Error(f"cannot read {path}: {type(e).__name__}: {e}; fix or replace the file") from None


@dataclass
class Tokenizer:
    hf: HFTokenizer
    bos_id: int | None  # id of the beginning-of-sequence token, None if the tokenizer has none
    eos_id: int | None  # id of the end-of-sequence token, None if the tokenizer has none

    def __post_init__(self):
        # text is text: a tokenizer.json saved with padding or truncation on would pad a short
        # document to its batch neighbours' length and cut a long one (a document's references
        # would depend on what it was encoded with), and "</s>" written in a document would become
        # the control token. Ids are only ever added by this code (BOS of the write prefix, EOS)
        self.hf.no_padding()
        self.hf.no_truncation()
        self.hf.encode_special_tokens = True

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise M3Error(
                f"no tokenizer.json in {path}: m3compile reads tokenizers through the `tokenizers` "
                "library; save one with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`"
            )
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise M3Error(f"cannot load {tj}: {e}; the file is not a valid tokenizers JSON") from None
        tc = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        for name, doc in (("tokenizer_config.json", tc), ("config.json", cfg)):
            if not isinstance(doc, dict):  # e.g. a JSON list: an AttributeError traceback on .get
                raise M3Error(f"{path / name} holds a JSON {type(doc).__name__}, not an object; fix or replace "
                              "the file")

        def resolve(name: str) -> int | None:
            content = _token_content(tc.get(f"{name}_token"))
            if content is not None and not isinstance(content, str):
                raise M3Error(f"tokenizer_config.json {name}_token is {content!r}, not a token's text; fix "
                              "tokenizer_config.json")
            if content is not None:
                tid = hf.token_to_id(content)
                if tid is None:
                    raise M3Error(
                        f"tokenizer_config.json names {name}_token {content!r} but tokenizer.json has no "
                        "such token; fix tokenizer_config.json"
                    )
                return tid
            tid = cfg.get(f"{name}_token_id")
            if isinstance(tid, list):  # some configs list several eos ids; the first is the canonical one
                tid = tid[0] if tid else None
            # an id the tokenizer does not have was an IndexError (a device-side assert on CUDA) at the
            # first forward that writes the prefix (whether the embedding has it, load_checkpoint checks)
            if tid is not None and (type(tid) is not int or tid < 0 or hf.id_to_token(tid) is None):
                raise M3Error(f"config.json {name}_token_id = {tid!r} is not a token id of tokenizer.json; fix "
                              "config.json")
            return tid

        return cls(hf=hf, bos_id=resolve("bos"), eos_id=resolve("eos"))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text`."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """encode_with_offsets of each text, encoded on the tokenizer's threads (without the GIL)."""
        return [(e.ids, e.offsets) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def write_prefix(tokenizer: Tokenizer, prefix: str) -> list[int]:
    """BOS (if the tokenizer has one) followed by the tokens of `prefix` (paper §3.2)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + (tokenizer.encode(prefix) if prefix else [])
