"""The text-only stream: documents from pydoc (ships with Python) or a .jsonl file, splits and chunks.

The default corpus is the stdlib `pydoc_data.topics.topics` dict: 79 help topics, about 465K characters
of English technical prose with code samples.
"""
import json
import os

import numpy as np

ACCEPTED_SOURCES = '"pydoc" or a path ending in .jsonl (one {"text": ...} object per line)'


def pydoc_documents() -> list[str]:
  """One document per pydoc topic, sorted by topic key, stripped, empties dropped."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  docs = (topics[key].strip() for key in sorted(topics))
  return [d for d in docs if d]


def jsonl_documents(path: str) -> list[str]:
  """The stripped "text" of each line of a JSON-lines file; blank lines and empty texts are skipped.

  Errors name the file and the 1-based line number.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"text corpus not found: {path}")
  docs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
      if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f'{path}:{lineno}: expected an object with a "text" field')
      text = record["text"]
      if not isinstance(text, str):
        raise ValueError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
      if text.strip():
        docs.append(text.strip())
  return docs


def load_text_documents(source: str) -> list[str]:
  """Documents of `source`: "pydoc", or a path ending in .jsonl."""
  if source == "pydoc":
    return pydoc_documents()
  if isinstance(source, str) and source.endswith(".jsonl"):
    return jsonl_documents(os.path.expanduser(source))
  raise ValueError(f"unknown text source {source!r}: expected {ACCEPTED_SOURCES}")


def split_documents(docs: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """Deterministic (train, test) split by whole document; each keeps the input order.

  The test split gets round(len(docs) * test_fraction) documents, but with two or more documents each
  split gets at least one (so test_fraction 0 still holds out one document, and 1 still trains on one).
  """
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
  n = len(docs)
  if n < 2:
    return list(docs), []
  n_test = min(max(round(n * test_fraction), 1), n - 1)
  test_idx = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())
  train = [d for i, d in enumerate(docs) if i not in test_idx]
  test = [d for i, d in enumerate(docs) if i in test_idx]
  return train, test
