import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3compile import corpus
from m3compile.corpus import CorpusReport, Document, iter_documents
from m3compile.errors import M3Error

from conftest import SHARED_DATA as DATA  # noqa: E402


@pytest.fixture
def mixed(tmp_path):
    """A corpus with one of every case formats/chunking.md names; returns (root, outside dir)."""
    root, outside = tmp_path / "corpus", tmp_path / "outside"
    (root / "docs" / "nested").mkdir(parents=True)
    outside.mkdir()
    (root / "a.txt").write_bytes(b"\xef\xbb\xbfAlpha line.\r\nSecond line.\r\n")  # BOM + CRLF
    (root / "docs-x.txt").write_text("dash sorts before slash", encoding="utf-8")
    (root / "docs" / "b.md").write_text("# Title\n\nBody text.\n", encoding="utf-8")
    (root / "docs" / "nested" / "c.txt").write_text("Nested café 日本 🙂", encoding="utf-8")
    (root / "docs" / "link.txt").symlink_to("../a.txt")  # inside the root: followed
    (root / "binary.txt").write_bytes(b"MZ\x00\x01\x02 binary")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\t\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")
    (outside / "secret.txt").write_text("outside the root", encoding="utf-8")
    (root / "outside.txt").symlink_to(outside / "secret.txt")
    (root / "loop").symlink_to(root)  # a directory link back to the root
    (root / "self.txt").symlink_to(root / "self.txt")  # a link to itself
    lines = [
        json.dumps({"id": "r1", "title": "T", "text": "one\r\ntwo"}),
        json.dumps({"_id": 7, "text": "seven"}),
        "{not json",
        json.dumps({"id": "r2"}),  # no text
        json.dumps({"id": "r3", "text": 5}),  # non-string text
        json.dumps({"text": "no id"}),
        json.dumps({"id": "r1", "text": "duplicate"}),
        "",
        json.dumps({"id": "r4", "text": "   "}),  # whitespace only
        json.dumps({"id": "r5", "title": "", "text": "blank title"}),
    ]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = pa.table(
        {
            "_id": ["p1", "p2", "r1", "p3"],
            "title": [None, "PT", None, None],
            "text": ["parquet one", "parquet two", "dup of jsonl", None],
            "extra": [1, 2, 3, 4],
        }
    )
    pq.write_table(table, root / "table.parquet")
    return root, outside


EXPECTED = [
    ("a.txt", "a.txt", "Alpha line.\nSecond line.\n"),
    ("docs-x.txt", "docs-x.txt", "dash sorts before slash"),
    ("docs/b.md", "docs/b.md", "# Title\n\nBody text.\n"),
    ("docs/link.txt", "docs/link.txt", "Alpha line.\nSecond line.\n"),
    ("docs/nested/c.txt", "docs/nested/c.txt", "Nested café 日本 🙂"),
    ("r1", "records.jsonl", "T\n\none\ntwo"),
    ("7", "records.jsonl", "seven"),
    ("r5", "records.jsonl", "blank title"),
    ("p1", "table.parquet", "parquet one"),
    ("p2", "table.parquet", "PT\n\nparquet two"),
]

EXPECTED_SKIPS = {
    "binary": 1,
    "not-utf8": 1,
    "empty": 3,  # empty.txt, blank.md, record r4
    "bad-json": 1,
    "bad-record": 4,  # r2 no text, r3 int text, no id, p3 null text
    "duplicate-id": 2,  # r1 again in records.jsonl and in table.parquet
    "unsupported-extension": 1,
    "symlink-outside-root": 1,
    "symlink-loop": 2,
}


def test_mixed_corpus_documents_and_report(mixed):
    root, _ = mixed
    report = CorpusReport()
    docs = list(iter_documents(root, report))
    assert [(d.doc_id, d.source, d.text) for d in docs] == EXPECTED
    assert dict(report.skipped) == EXPECTED_SKIPS
    assert report.documents == len(EXPECTED)
    assert report.files == 11  # every .txt/.md/.jsonl/.parquet opened, the skipped ones included
    where = {(s.reason, s.source, s.line) for s in report.examples}
    assert ("bad-json", "records.jsonl", 3) in where
    assert ("duplicate-id", "records.jsonl", 7) in where
    assert ("duplicate-id", "table.parquet", 3) in where
    assert sum(s.reason == "bad-record" for s in report.examples) == corpus.MAX_EXAMPLES  # 4 seen, 3 kept
    assert ("not-utf8", "latin1.txt", None) in where
    assert ("symlink-outside-root", "outside.txt", None) in where
    lines = report.summary_lines()
    assert lines[0] == "10 documents from 11 files"
    assert any("skipped 1 x not-utf8" == line for line in lines)
    assert any("records.jsonl:3" in line for line in lines)


def test_walk_is_deterministic_and_independent_of_batching(mixed, monkeypatch):
    root, _ = mixed
    first = list(iter_documents(root, CorpusReport()))
    monkeypatch.setattr(corpus, "PARQUET_BATCH_ROWS", 1)  # every row its own batch
    report = CorpusReport()
    assert list(iter_documents(root, report)) == first
    assert dict(report.skipped) == EXPECTED_SKIPS


def test_follow_symlinks_reads_outside_target(mixed):
    root, _ = mixed
    report = CorpusReport()
    docs = {d.doc_id: d for d in iter_documents(root, report, follow_symlinks=True)}
    assert docs["outside.txt"] == Document("outside.txt", "outside.txt", "outside the root")
    assert "symlink-outside-root" not in report.skipped
    assert report.skipped["symlink-loop"] == 2


def test_single_file_root(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"line one\r\nline two\rthree")
    report = CorpusReport()
    assert list(iter_documents(path, report)) == [Document("book.txt", "book.txt", "line one\nline two\nthree")]
    jsonl = tmp_path / "recs.jsonl"
    jsonl.write_text('{"id": 1, "text": "x"}\n', encoding="utf-8")
    assert list(iter_documents(jsonl, CorpusReport())) == [Document("1", "recs.jsonl", "x")]


def test_parquet_without_text_column_is_reported(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "body": ["no text column"]}), tmp_path / "t.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    report = CorpusReport()
    assert list(iter_documents(tmp_path, report)) == []
    assert report.skipped == {"bad-file": 2}
    with pytest.raises(M3Error, match="no readable document.*2 bad-file"):
        report.raise_if_empty()


def test_input_that_no_later_step_could_take_is_skipped_not_raised(tmp_path):
    # each of these crashed a compile with a traceback: a JSON escape of a lone surrogate, a name
    # that is not UTF-8, JSON nested deeper than Python parses, an integer past its 4,300 digits, a
    # parquet string column that is not UTF-8; a BOM before a .jsonl's first record dropped it
    import os

    root = tmp_path / "c"
    root.mkdir()
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"id": "bom", "text": "first record"}\n'
                                   b'{"id": "s", "text": "lone \\ud800 half"}\n'
                                   + b"[" * 200_000 + b"\n" + b'{"id": ' + b"9" * 5000 + b', "text": "big"}\n'
                                   b'{"id": "ok", "text": "kept"}\n')
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    (root / "caf\udce9" / "x.txt").write_text("in a directory whose name is not UTF-8")
    table = pa.table({"id": pa.array(["p"]), "text": pa.array([b"\xff\xfe not utf-8"], pa.binary()).cast(pa.string(), safe=False)})
    pq.write_table(table, root / "b.parquet")
    report = CorpusReport()
    docs = list(iter_documents(root, report))
    assert [d.doc_id for d in docs] == ["bom", "ok"]
    assert report.skipped == {"bad-record": 1, "bad-json": 2, "bad-name": 1, "bad-file": 1}, report.skipped
    assert any("caf\\xe9" in line for line in report.summary_lines())


def test_a_knowledge_base_inside_the_corpus_is_recognised_without_its_lock(tmp_path):
    # a committed kb is its manifest beside a generation directory (not the lock of a compile under
    # way), also through a directory link; a folder with some other manifest.json is walked
    root = tmp_path / "c"
    (root / "kb" / "gen-0123456789abcdef" / "bm25").mkdir(parents=True)
    (root / "kb" / "manifest.json").write_text("{}")
    (root / "kb" / "gen-0123456789abcdef" / "bm25" / "corpus.jsonl").write_text('{"ref_id": 1}\n')
    (root / "app").mkdir()
    (root / "app" / "manifest.json").write_text('{"name": "web app"}')
    (root / "app" / "notes.txt").write_text("walked")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")
    (tmp_path / "other" / "gen-fedcba9876543210").mkdir()
    (root / "linked").symlink_to(tmp_path / "other")
    report = CorpusReport()
    assert [d.doc_id for d in iter_documents(root, report, follow_symlinks=True)] == ["app/notes.txt"]
    assert report.skipped == {"knowledge-base": 2, "unsupported-extension": 1}, report.skipped


def test_user_errors(tmp_path):
    with pytest.raises(M3Error, match="does not exist"):
        iter_documents(tmp_path / "missing", CorpusReport())
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(M3Error, match="unsupported type"):
        iter_documents(tmp_path / "x.csv", CorpusReport())
    report = CorpusReport()
    assert list(iter_documents(tmp_path, report)) == []
    with pytest.raises(M3Error, match="no readable document"):
        report.raise_if_empty()


@pytest.mark.skipif(not (DATA / "gutenberg" / "pg120.txt").is_file(), reason="shared data absent: no gutenberg")
def test_gutenberg_bom_and_crlf_are_normalised():
    raw = (DATA / "gutenberg" / "pg120.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    (doc,) = iter_documents(DATA / "gutenberg" / "pg120.txt", CorpusReport())
    assert doc.text == raw[3:].decode("utf-8").replace("\r\n", "\n")
    assert "\r" not in doc.text and not doc.text.startswith("\ufeff")


@pytest.mark.skipif(not (DATA / "scifact" / "corpus.jsonl").is_file(), reason="shared data absent: no scifact")
def test_scifact_beir_records():
    report = CorpusReport()
    docs = list(iter_documents(DATA / "scifact" / "corpus.jsonl", report))
    assert report.documents == len(docs) == 5183 and not report.skipped
    with open(DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert docs[0] == Document(first["_id"], "corpus.jsonl", first["title"] + "\n\n" + first["text"])

