"""A sentencepiece BPE tokenizer with fixed special ids and real BOI / EOI control ids.

Ids 0..3 are PAD, UNK, BOS, EOS in every model trained here; "<boi>" and "<eoi>" are control symbols
(ids 4 and 5 in practice) that `encode` never produces from text, not even from the literal strings.
Text round-trips exactly: no normalization, whitespace and newlines kept, unseen characters fall back to
UTF-8 byte pieces (so UNK never appears either).
"""
import io
import os
import re
from typing import Callable, Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BOI_PIECE, EOI_PIECE = "<boi>", "<eoi>"

# sentencepiece skips training sentences longer than max_sentence_length (4192 bytes by default).
_MAX_PIECE_BYTES = 4000


class Tokenizer:
  """Wraps a sentencepiece model; BOI and EOI are control symbols "<boi>", "<eoi>" (real ids)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    if not self._proto:
      raise ValueError("empty sentencepiece model")
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)  # RuntimeError if not a model
    fixed = dict(pad_id=(self._sp.pad_id(), PAD_ID), unk_id=(self._sp.unk_id(), UNK_ID),
                 bos_id=(self._sp.bos_id(), BOS_ID), eos_id=(self._sp.eos_id(), EOS_ID))
    for name, (got, want) in fixed.items():
      if got != want:
        raise ValueError(f"sentencepiece model has {name}={got}, tfusion needs {want}")
    self._boi = self._control_id(BOI_PIECE)
    self._eoi = self._control_id(EOI_PIECE)
    self._specials = frozenset((PAD_ID, UNK_ID, BOS_ID, EOS_ID, self._boi, self._eoi))

  def _control_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if i == UNK_ID or not self._sp.is_control(i):
      raise ValueError(f"sentencepiece model has no control symbol {piece!r}")
    return i

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Reads a .model file; FileNotFoundError / ValueError name the path."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer model not found: {path}")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto)
    except (RuntimeError, ValueError) as e:
      raise ValueError(f"not a usable tfusion sentencepiece model: {path}: {e}") from e

  def save(self, path: str) -> None:
    """Writes the .model bytes atomically (temporary file, then rename)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        f.write(self._proto)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def __reduce__(self):
    # Pickles as its model bytes (grain worker processes receive the tokenizer this way).
    return (Tokenizer, (self._proto,))

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    """Number of pieces actually in the model (may be below the requested size for small corpora)."""
    return self._sp.get_piece_size()

  @property
  def requested_vocab_size(self) -> int:
    """The vocab_size asked of `train_tokenizer` (from the trainer spec); >= vocab_size."""
    return _parse(self._proto).trainer_spec.vocab_size

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def boi_id(self) -> int:
    return self._boi

  @property
  def eoi_id(self) -> int:
    return self._eoi

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS / EOS added."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    """Text of `ids` (any int sequence or array); PAD/UNK/BOS/EOS/BOI/EOI are dropped, nothing stops it.

    Ids outside [0, vocab_size) raise ValueError. A cut through a multi-byte character decodes to U+FFFD.
    """
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
    return self._sp.decode([i for i in ids if i not in self._specials])


def _parse(model_proto: bytes) -> sentencepiece_model_pb2.ModelProto:
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  return m


def _record_requested_vocab_size(model_proto: bytes, vocab_size: int) -> bytes:
  """With hard_vocab_limit=False sentencepiece stores the reached size in trainer_spec.vocab_size;
  put the requested size back so `load_or_train_tokenizer` can check a file against the config."""
  m = _parse(model_proto)
  if m.trainer_spec.vocab_size == vocab_size:
    return model_proto
  m.trainer_spec.vocab_size = vocab_size
  return m.SerializeToString(deterministic=True)


def _training_pieces(text: str) -> Iterator[str]:
  """Cuts `text` into runs of whole lines of at most _MAX_PIECE_BYTES bytes (overlong lines are cut too)."""
  piece, size = [], 0
  for line in text.splitlines(keepends=True):
    while len(line.encode("utf-8")) > _MAX_PIECE_BYTES:
      head = line[:_MAX_PIECE_BYTES // 4]   # a character is at most 4 UTF-8 bytes
      line = line[len(head):]
      yield head
    n = len(line.encode("utf-8"))
    if size + n > _MAX_PIECE_BYTES and piece:
      yield "".join(piece)
      piece, size = [], 0
    piece.append(line)
    size += n
  if piece:
    yield "".join(piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    seed_sentences_limit: int | None = None) -> Tokenizer:
  """Trains a BPE model in-process; deterministic (same texts -> identical model bytes).

  Texts are cut into runs of lines below sentencepiece's sentence length limit. `seed_sentences_limit`
  caps how many of those runs are used (the first ones, in order). With `hard_vocab_limit=False` a small
  corpus may give fewer than `vocab_size` pieces; the minimum vocab_size is 262 + distinct characters.
  """
  sentences = [p for t in texts if t and not t.isspace() for p in _training_pieces(t)]
  if seed_sentences_limit is not None:
    sentences = sentences[:seed_sentences_limit]
  if not sentences:
    raise ValueError("train_tokenizer: no non-empty training text")
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, control_symbols=[BOI_PIECE, EOI_PIECE],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, hard_vocab_limit=False)
  except RuntimeError as e:
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if m:
      raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least {m.group(2)} "
                       "(6 special + 256 byte pieces + every distinct character)") from e
    if "smaller than required_chars" in str(e):
      raise ValueError(f"vocab_size={vocab_size} is too small for this corpus") from e
    raise
  return Tokenizer(_record_requested_vocab_size(writer.getvalue(), vocab_size))


def load_or_train_tokenizer(path: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int) -> Tokenizer:
  """Loads `path` if it exists (its vocab_size must match), else trains on texts_fn() and saves to `path`."""
  if os.path.exists(path):
    tok = Tokenizer.load(path)
    if tok.requested_vocab_size != vocab_size:
      raise ValueError(f"tokenizer at {path} was trained with vocab_size {tok.requested_vocab_size} "
                       f"({tok.vocab_size} pieces), but vocab_size {vocab_size} was asked for; delete the "
                       "file to retrain or change the config")
    return tok
  tok = train_tokenizer(texts_fn(), vocab_size)
  tok.save(path)
  return tok
