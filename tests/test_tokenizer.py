"""Tokenizer: fixed special ids, real BOI/EOI, exact round trips, determinism, files and errors."""
import os
import pickle

import numpy as np
import pytest

from tfusion.data import text_corpus
from tfusion.data import tokenizer as tk


@pytest.fixture(scope="module")
def docs():
  return text_corpus.pydoc_documents()


@pytest.fixture(scope="module")
def tok(docs):
  return tk.train_tokenizer(docs, 512)


def _never_called():
  raise AssertionError("texts_fn must not be called when the tokenizer file exists")


def test_special_ids_are_fixed(tok):
  assert (tk.PAD_ID, tk.UNK_ID, tk.BOS_ID, tk.EOS_ID) == (0, 1, 2, 3)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.boi_id >= 4 and tok.eoi_id >= 4 and tok.boi_id != tok.eoi_id
  assert (tok.boi_id, tok.eoi_id) == (4, 5)
  assert tok.vocab_size == 512 and tok.requested_vocab_size == 512


def test_encode_never_produces_special_ids(tok, docs):
  text = docs[0] + " <boi> an image <eoi> <s></s><pad><unk> and <boi><eoi>"
  specials = {0, 1, 2, 3, tok.boi_id, tok.eoi_id}
  ids = tok.encode(text)
  assert ids and not specials & set(ids)
  for d in docs:
    assert not specials & set(tok.encode(d))
  assert tok.decode(ids) == text   # the literal strings survive as ordinary text


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  # two  spaces\n\n\ttab\r\nend ",
    "  leading and trailing  ",
    "Ünïcödé 画像",
    "ﬁ ＡＢＣ \x00 emoji 🙂",
    "",
])
def test_round_trip_is_exact(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_pieces(tok):
  # 画 is not in the pydoc corpus: it becomes its 3 UTF-8 bytes, ids 6..261, never UNK.
  ids = tok.encode("画")
  assert len(ids) == 3 and all(6 <= i < 262 for i in ids)
  assert [i - 6 for i in ids] == list("画".encode("utf-8"))


def test_whole_corpus_round_trips(tok, docs):
  assert all(tok.decode(tok.encode(d)) == d for d in docs)


def test_decode_drops_special_ids(tok):
  ids = tok.encode("hello world")
  noisy = [tok.bos_id, tok.boi_id] + ids[:1] + [tok.pad_id, tok.eoi_id, tok.unk_id] + ids[1:] + [tok.eos_id, 0]
  assert tok.decode(noisy) == "hello world"
  assert tok.decode(np.array(noisy, np.int32)) == "hello world"
  assert tok.decode([tok.eos_id] + ids) == "hello world"   # EOS does not stop decoding
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])


def test_training_is_deterministic(docs, tok):
  again = tk.train_tokenizer(docs, 512)
  assert again.model_proto == tok.model_proto
  other = tk.train_tokenizer(docs[:20], 512)
  assert other.model_proto != tok.model_proto


def test_long_lines_are_split_for_training():
  # One 15 KB line: sentencepiece alone would skip it (max_sentence_length 4192) and have nothing to learn.
  tok = tk.train_tokenizer(["tokenizer " * 1500], 300)
  assert len(tok.encode("tokenizer")) == 1
  assert len(tok.encode("tokenizer " * 10)) == 11   # "tokenizer", 9 x "▁tokenizer", "▁"


def test_seed_sentences_limit_uses_the_first_sentences(docs):
  limited = tk.train_tokenizer(docs, 400, seed_sentences_limit=1)
  first_only = tk.train_tokenizer(docs[:1][:1], 400)
  full = tk.train_tokenizer(docs, 400)
  assert limited.model_proto != full.model_proto
  # docs[0] is shorter than one training sentence, so the limit keeps exactly it.
  assert len(docs[0].encode()) < 4000
  assert limited.model_proto == first_only.model_proto


def test_small_corpus_records_requested_vocab_size(tmp_path):
  tok = tk.train_tokenizer(["hello world"], 1000)
  assert tok.vocab_size == 288 and tok.requested_vocab_size == 1000   # 262 + 8 chars + 18 merges
  path = str(tmp_path / "small.model")
  tok.save(path)
  assert tk.load_or_train_tokenizer(path, _never_called, 1000).vocab_size == 288


def test_save_load_round_trip(tok, tmp_path):
  path = str(tmp_path / "sub" / "tok.model")
  tok.save(path)
  assert os.listdir(tmp_path / "sub") == ["tok.model"]   # no temporary file left behind
  with open(path, "rb") as f:
    assert f.read() == tok.model_proto
  loaded = tk.Tokenizer.load(path)
  text = "Ünïcödé 画像 and the for statement"
  assert loaded.encode(text) == tok.encode(text)
  assert (loaded.boi_id, loaded.eoi_id, loaded.vocab_size) == (tok.boi_id, tok.eoi_id, tok.vocab_size)


def test_pickle_round_trip(tok):
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.model_proto == tok.model_proto
  assert copy.encode("while loop") == tok.encode("while loop")


def test_load_or_train_trains_once_then_loads(docs, tok, tmp_path):
  path = str(tmp_path / "tok.model")
  calls = []

  def texts_fn():
    calls.append(1)
    return docs

  first = tk.load_or_train_tokenizer(path, texts_fn, 512)
  assert calls == [1] and os.path.exists(path)
  assert first.model_proto == tok.model_proto
  second = tk.load_or_train_tokenizer(path, _never_called, 512)
  assert second.model_proto == first.model_proto


def test_load_or_train_vocab_mismatch(tok, tmp_path):
  path = str(tmp_path / "tok.model")
  tok.save(path)
  with pytest.raises(ValueError) as e:
    tk.load_or_train_tokenizer(path, _never_called, 1024)
  assert "512" in str(e.value) and "1024" in str(e.value) and path in str(e.value)


def test_missing_file_names_path(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tk.Tokenizer.load(path)


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model"])
def test_corrupt_file_names_path(tmp_path, content):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="bad.model"):
    tk.Tokenizer.load(str(path))


def test_model_without_tfusion_specials_is_rejected():
  import io  # pylint: disable=import-outside-toplevel
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 10), model_writer=writer,
                                 vocab_size=20, minloglevel=2, hard_vocab_limit=False)
  with pytest.raises(ValueError, match="pad_id=-1"):   # sentencepiece defaults: no pad, unk 0
    tk.Tokenizer(writer.getvalue())


def test_too_small_vocab_says_minimum():
  # "hello world": 8 distinct characters (space is "▁") + 6 special + 256 byte pieces = 270.
  with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*at least 270"):
    tk.train_tokenizer(["hello world"], 100)
  assert tk.train_tokenizer(["hello world"], 270).vocab_size == 270


def test_empty_corpus_is_an_error():
  with pytest.raises(ValueError, match="no non-empty training text"):
    tk.train_tokenizer(["", "  \n"], 512)
