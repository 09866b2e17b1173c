"""Text corpus: pydoc documents, .jsonl parsing and its errors, document splits, token chunks."""
import json

import pytest
from pydoc_data.topics import topics

from tfusion.data import text_corpus as tc


def test_pydoc_documents():
  docs = tc.pydoc_documents()
  assert len(docs) > 50
  assert sum(len(d) for d in docs) > 400_000
  assert docs[0] == topics[sorted(topics)[0]].strip()
  assert all(d and d == d.strip() for d in docs)
  assert docs == tc.pydoc_documents()


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_jsonl_documents(tmp_path):
  path = _write_lines(tmp_path / "docs.jsonl", [
      json.dumps({"text": "first document"}),
      "",
      json.dumps({"text": "  Ünïcödé 画像\nsecond line  ", "id": 7}),
      json.dumps({"text": "   "}),
      json.dumps({"text": "last"}, ensure_ascii=False),
  ])
  assert tc.jsonl_documents(path) == ["first document", "Ünïcödé 画像\nsecond line", "last"]
  assert tc.load_text_documents(path) == tc.jsonl_documents(path)


@pytest.mark.parametrize("bad_line, reason", [
    ('{"text": "unterminated', "invalid JSON"),
    ('{"content": "no text field"}', '"text" field'),
    ('["text", "a list"]', '"text" field'),
    ('{"text": 42}', "must be a string, got int"),
    ('{"text": null}', "must be a string, got NoneType"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, reason):
  path = _write_lines(tmp_path / "broken.jsonl", [json.dumps({"text": "ok"}), "", bad_line])
  with pytest.raises(ValueError) as e:
    tc.jsonl_documents(path)
  assert f"{path}:3:" in str(e.value) and reason in str(e.value)


def test_jsonl_missing_file(tmp_path):
  path = str(tmp_path / "absent.jsonl")
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    tc.jsonl_documents(path)
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    tc.load_text_documents(path)


def test_load_text_documents_sources():
  assert tc.load_text_documents("pydoc") == tc.pydoc_documents()
  for source in ("wikipedia", "corpus.txt", "PYDOC"):
    with pytest.raises(ValueError) as e:
      tc.load_text_documents(source)
    assert repr(source) in str(e.value) and '"pydoc"' in str(e.value) and ".jsonl" in str(e.value)


def test_split_is_deterministic_disjoint_and_covering():
  docs = [f"doc {i}" for i in range(100)]
  train, test = tc.split_documents(docs, 0.1, seed=0)
  assert (train, test) == tc.split_documents(docs, 0.1, seed=0)
  assert len(test) == 10 and len(train) == 90
  assert not set(train) & set(test)
  assert sorted(train + test) == sorted(docs)
  assert train == [d for d in docs if d in set(train)]   # input order kept
  assert tc.split_documents(docs, 0.1, seed=1)[1] != test


def test_split_keeps_one_document_in_each_side():
  docs = ["a", "b", "c"]
  assert len(tc.split_documents(docs, 0.01, seed=0)[1]) == 1
  assert len(tc.split_documents(docs, 0.0, seed=0)[1]) == 1
  assert len(tc.split_documents(docs, 1.0, seed=0)[0]) == 1
  train, test = tc.split_documents(["x", "y"], 0.5, seed=3)
  assert len(train) == 1 and len(test) == 1 and sorted(train + test) == ["x", "y"]
  assert tc.split_documents(["only"], 0.5, seed=0) == (["only"], [])
  assert tc.split_documents([], 0.5, seed=0) == ([], [])
  with pytest.raises(ValueError, match="test_fraction"):
    tc.split_documents(docs, 1.5, seed=0)
