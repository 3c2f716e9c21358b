"""Stage 1: read a corpus directory (or one file) into documents, in a deterministic order.

The paper's knowledge base is plain text cut into references (Memory³ §3.1, §4.4); this stage only
turns files into `Document`s. What is read, how ids are formed and what is skipped is specified in
formats/chunking.md. Bad input never crashes the walk: it is counted in a `CorpusReport` and
skipped, and the caller raises `report.raise_if_empty()` if nothing readable was found.
"""

import errno
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from m3compile.errors import M3Error

TEXT_SUFFIXES = (".txt", ".md")  # the whole file is one document
RECORD_SUFFIXES = (".jsonl", ".parquet")  # one document per line / row
TITLE_JOINER = "\n\n"  # text = title + TITLE_JOINER + text when a record has a non-blank title
PARQUET_BATCH_ROWS = 1024  # rows read at a time, so a large parquet file never sits whole in memory
MAX_EXAMPLES = 3  # examples kept per skip reason


@dataclass(frozen=True)
class Document:
    doc_id: str  # unique within the corpus: relative POSIX path for .txt/.md, the record id otherwise
    source: str  # POSIX path of the file relative to the corpus root (the file name for a file root)
    text: str  # BOM stripped, CRLF and lone CR turned into LF, otherwise as stored


@dataclass(frozen=True)
class Skip:
    reason: str  # one of the reason names in formats/chunking.md, e.g. "not-utf8"
    source: str  # file, relative to the root
    line: int | None  # 1-based line (.jsonl) or row (.parquet); None for a whole file
    detail: str  # short human-readable cause


@dataclass
class CorpusReport:
    root: str = ""  # the root as given, for messages
    documents: int = 0  # documents yielded
    files: int = 0  # files of a supported type that were opened
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[Skip] = field(default_factory=list)  # first MAX_EXAMPLES skips of each reason

    def skip(self, reason: str, source: str, line: int | None = None, detail: str = "") -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= MAX_EXAMPLES:
            self.examples.append(Skip(reason, source, line, detail))

    def summary_lines(self) -> list[str]:
        lines = [f"{self.documents} documents from {self.files} files"]
        for reason in sorted(self.skipped):
            lines.append(f"skipped {self.skipped[reason]} x {reason}")
            for ex in self.examples:
                if ex.reason == reason:
                    where = ex.source if ex.line is None else f"{ex.source}:{ex.line}"
                    lines.append(f"  e.g. {where}: {ex.detail}" if ex.detail else f"  e.g. {where}")
        return lines

    def raise_if_empty(self) -> None:
        if self.documents == 0:
            if self.skipped:
                # the first skip's detail says what was wrong: with nothing read, no log line follows
                ex = next((e for e in self.examples if e.detail), None)
                where = "" if ex is None else ex.source if ex.line is None else f"{ex.source}:{ex.line}"
                why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) + (
                    f"; e.g. {where}: {ex.detail}" if ex is not None else "")
            elif self.files:
                why = f"{self.files} file{'s' if self.files > 1 else ''} read, no text in {'them' if self.files > 1 else 'it'}"
            else:
                why = "no .txt, .md, .jsonl or .parquet file in it"
            raise M3Error(
                f"no readable document in corpus {self.root} ({why}); add UTF-8 .txt/.md files or "
                ".jsonl/.parquet records with id/_id and text"
            )

    def log_skips(self, log) -> None:
        """One line per reason skipped, with its examples (what compile prints at its end)."""
        for line in self.summary_lines()[1:]:
            log(line)


def normalize_text(text: str) -> str:
    # offsets into the text must refer to what is stored, so normalise once, here, and nowhere else
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(root: Path, report: CorpusReport, follow_symlinks: bool = False) -> Iterator[Document]:
    """Yield the corpus's documents in sorted order of relative POSIX path (records in file order).

    Args:
        root: a directory, walked recursively, or a single .txt/.md/.jsonl/.parquet file.
        report: filled with counts and examples of what was read and skipped.
        follow_symlinks: also follow symlinks whose target lies outside `root`.
    Returns:
        An iterator of `Document`. Records (.jsonl/.parquet: `id` or `_id`, `text`, optional
        `title`) become `title + "\\n\\n" + text` when the title is not blank.
    Example:
        >>> report = CorpusReport()
        >>> docs = list(iter_documents(Path("corpus"), report))
        >>> report.raise_if_empty()
    """
    root = Path(root)
    report.root = str(root)
    if not root.exists():
        raise M3Error(f"corpus {root} does not exist; pass an existing directory or file")
    if root.is_file():
        if root.suffix.lower() not in TEXT_SUFFIXES + RECORD_SUFFIXES:
            raise M3Error(
                f"corpus file {root} has an unsupported type; use .txt, .md, .jsonl or .parquet, "
                "or pass a directory"
            )
        return _read_files([(root.name, root)], report)
    if not root.is_dir():
        raise M3Error(f"corpus {root} is neither a file nor a directory; pass a directory of text files")
    return _read_files(_walk(root, report, follow_symlinks), report)


# what marks a directory as a knowledge base (formats/README.md): the lock of a compile under way
# (or one a killed compile left), or a committed kb's manifest beside its generation directory
KB_LOCK, KB_MANIFEST = ".m3.lock", "manifest.json"
_GENERATION = re.compile(r"gen-[0-9a-f]{16}")


def _is_kb(path: Path) -> bool:
    """Whether a directory of the corpus is a kb. A `manifest.json` of something else (a web app's)
    does not make one without a `gen-<16 hex>` directory beside it. An unreadable directory is not
    a kb: the walk reports it."""
    try:
        if (path / KB_LOCK).exists():
            return True
        if not (path / KB_MANIFEST).is_file():
            return False
        with os.scandir(path) as entries:
            return any(_GENERATION.fullmatch(e.name) and e.is_dir(follow_symlinks=False) for e in entries)
    except OSError:
        return False


def _walk(root: Path, report: CorpusReport, follow_symlinks: bool) -> list[tuple[str, Path]]:
    # collect every path first: sorting the full relative paths (not per directory) is what makes
    # the order the same on every OS and filesystem; the list holds paths only, not contents
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    # stack of (dir path, relative prefix, real paths of the dirs above it) so a link back to an
    # ancestor is seen as a loop and the walk always ends
    stack = [(root, "", (real_root,))]
    while stack:
        path, prefix, ancestors = stack.pop()
        try:
            # sorted so that the skip examples, too, come out the same on every filesystem
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as e:
            report.skip("unreadable", prefix or ".", None, e.strerror or str(e))
            continue
        for entry in entries:
            rel = prefix + entry.name
            p = Path(entry.path)
            if not _is_unicode(entry.name):  # bytes that are not UTF-8: no doc_id, hash or table takes them
                report.skip("bad-name", os.fsencode(rel).decode("utf-8", "backslashreplace"), None,
                            "the name is not UTF-8; rename it")
                continue
            if entry.is_symlink():
                try:
                    target = p.resolve(strict=True)
                except (OSError, RuntimeError) as e:  # RuntimeError: a link loop before Python 3.13
                    loop = isinstance(e, RuntimeError) or e.errno == errno.ELOOP
                    report.skip("symlink-loop" if loop else "broken-symlink", rel, None, str(e))
                    continue
                if not follow_symlinks and not target.is_relative_to(real_root):
                    report.skip("symlink-outside-root", rel, None, f"points to {target}")
                    continue
                if target.is_dir():
                    if target in ancestors:
                        report.skip("symlink-loop", rel, None, f"points back to {target}")
                    elif _is_kb(target):
                        report.skip("knowledge-base", rel + "/", None, "a knowledge base inside the corpus, not read")
                    else:
                        stack.append((p, rel + "/", ancestors + (target,)))
                    continue
            elif entry.is_dir(follow_symlinks=False):
                if _is_kb(p):  # e.g. `m3 compile docs/ -o docs/kb`: its indexes and tables are not text
                    report.skip("knowledge-base", rel + "/", None, "a knowledge base inside the corpus, not read")
                else:
                    stack.append((p, rel + "/", ancestors + (p.resolve(),)))
                continue
            if not p.is_file():
                report.skip("not-a-file", rel, None, "not a regular file")
            elif p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES:
                found.append((rel, p))
            else:
                report.skip("unsupported-extension", rel, None, p.suffix or "no extension")
    found.sort(key=lambda item: item[0])
    return found


def _read_files(files, report: CorpusReport) -> Iterator[Document]:
    seen: set[str] = set()  # doc ids so far; the first wins
    for rel, path in files:
        report.files += 1
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            docs = _read_text_file(rel, path, report)
        elif suffix == ".jsonl":
            docs = _read_jsonl(rel, path, report)
        else:
            docs = _read_parquet(rel, path, report)
        for doc, line in docs:
            if doc.doc_id in seen:
                report.skip("duplicate-id", rel, line, f"id {doc.doc_id!r} seen before")
                continue
            seen.add(doc.doc_id)
            report.documents += 1
            yield doc


def _read_text_file(rel: str, path: Path, report: CorpusReport):
    try:
        data = path.read_bytes()
    except OSError as e:
        report.skip("unreadable", rel, None, e.strerror or str(e))
        return
    # text files never hold NUL; UTF-16 and binaries do, and strict UTF-8 would accept some of them
    if b"\x00" in data:
        report.skip("binary", rel, None, "contains NUL bytes")
        return
    try:
        text = normalize_text(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        report.skip("not-utf8", rel, None, f"invalid UTF-8 at byte {e.start}")
        return
    del data  # not held while the document is compiled (a 50 MB single line: issue 16)
    if not text or text.isspace():  # blank (strip() would copy the whole text)
        report.skip("empty", rel, None, "no text")
        return
    yield Document(rel, rel, text), None


def _is_unicode(s: str) -> bool:
    """Whether `s` encodes as UTF-8: JSON's "\\ud800" escape decodes to an unpaired surrogate, which
    no later step (hashing, Arrow, the tokenizer) takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record(rec, rel: str, line: int, report: CorpusReport) -> Document | None:
    # one record of a .jsonl/.parquet file -> a document, or a counted skip
    if not isinstance(rec, dict):
        report.skip("bad-record", rel, line, "not a JSON object")
        return None
    rid = rec.get("id") if rec.get("id") is not None else rec.get("_id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        report.skip("bad-record", rel, line, "missing or invalid id/_id (need a string or integer)")
        return None
    text, title = rec.get("text"), rec.get("title")
    if not isinstance(text, str):
        report.skip("bad-record", rel, line, "missing or non-string text")
        return None
    if title is not None and not isinstance(title, str):
        report.skip("bad-record", rel, line, "non-string title")
        return None
    if not all(map(_is_unicode, (str(rid), text, title or ""))):
        report.skip("bad-record", rel, line, "id, title or text holds an unpaired surrogate (not Unicode text)")
        return None
    if title and title.strip():
        text = title + TITLE_JOINER + text
    text = normalize_text(text)
    if not text.strip():
        report.skip("empty", rel, line, f"record {rid!r} has no text")
        return None
    return Document(str(rid), rel, text)


def _read_jsonl(rel: str, path: Path, report: CorpusReport):
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark (PowerShell's utf8) is not part of the record
                if not raw.strip():
                    continue  # blank lines (a trailing newline) are not records
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5,000-digit int, [[[[...
                    report.skip("bad-json", rel, line_no, (str(e).splitlines() or [type(e).__name__])[0][:80])
                    continue
                doc = _record(rec, rel, line_no, report)
                if doc is not None:
                    yield doc, line_no
    except OSError as e:
        report.skip("unreadable", rel, None, e.strerror or str(e))


def _read_parquet(rel: str, path: Path, report: CorpusReport):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        id_col = "id" if "id" in names else "_id" if "_id" in names else None
        if id_col is None or "text" not in names:
            report.skip("bad-file", rel, None, "parquet file needs an id or _id column and a text column")
            return
        cols = [id_col, "text"] + (["title"] if "title" in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
            for rec in batch.to_pylist():
                row += 1
                doc = _record(rec, rel, row, report)
                if doc is not None:
                    yield doc, row
    except (OSError, pa.ArrowException, ValueError, OverflowError) as e:  # bad UTF-8, dates past 9999
        report.skip("bad-file", rel, None, (str(e).splitlines() or [type(e).__name__])[0][:80])
