"""Readers of the raw sources `tfusion.prepare` accepts, and the record each raw example becomes.

Every reader numbers its examples per split, 0..count-1, and reads any range of them, so a split can be
cut into shards that worker processes (and hosts) prepare independently. An example is (id, raw): the id
names it in the skip report (a file, a file:line, or a TFDS index).

  image_folder  images under `path` (sorted), captions from sidecar <stem>.txt files or from a CSV / JSONL
                manifest with columns "file" and "caption"
  jsonl         one {"text": ...} document per line
  edit_jsonl    one {"input": image file, "instruction": ..., "output": image file} per line, files relative
                to the .jsonl
  tfds          any TFDS dataset by name (`tfds.data_source`, array_record), fields picked by the config
"""
import csv
import hashlib
import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from tfusion.data.images import BadRecord, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def decode_text(value, what: str) -> str:
  """utf-8 bytes or str -> stripped str; BadRecord for non-UTF-8 or empty text (or a BadRecord value)."""
  if isinstance(value, BadRecord):
    raise value
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(f"non-UTF-8 {what}: {e}") from e
  if not isinstance(value, str):
    raise BadRecord(f"{what} is a {type(value).__name__}, not text")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:      # e.g. an unpaired surrogate from a JSON "\ud83d"
    raise BadRecord(f"non-UTF-8 {what}: {e}") from e
  value = value.lstrip("\ufeff").strip()
  if not value:
    raise BadRecord(f"empty {what}")
  return value


class ImageFolder:
  kind = "image_caption"

  def __init__(self, path: str, split: str, captions: str = ""):
    self.root, self.split = os.path.expanduser(path), split
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"image folder not found: {path}")
    if captions:
      self.items = _caption_manifest(os.path.expanduser(captions))
    else:
      files = (os.path.relpath(os.path.join(d, f), self.root) for d, _, names in os.walk(self.root) for f in names)
      self.items = [(f, None) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.items:
      raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")

  def splits(self) -> list[str]:
    return [self.split]

  def count(self, split: str) -> int:
    return len(self.items)

  def fingerprint(self, split: str) -> str:
    listing = "".join(f"{file}\t{caption if isinstance(caption, str) else ''}\n" for file, caption in self.items)
    return f"{len(self.items)} images, sha256 {hashlib.sha256(listing.encode('utf-8', 'replace')).hexdigest()}"

  def read(self, split: str, start: int, stop: int) -> Iterator[tuple[str, tuple]]:
    for file, caption in self.items[start:stop]:
      if isinstance(caption, BadRecord):      # a bad manifest row
        yield file, (None, caption)
        continue
      path = os.path.join(self.root, file)
      if caption is None:
        sidecar = os.path.splitext(path)[0] + ".txt"
        caption = _read_bytes(sidecar) if os.path.isfile(sidecar) else BadRecord(f"no caption file: {sidecar}")
      yield file, (path, caption)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _caption_manifest(path: str) -> list[tuple[str, object]]:
  """(file, caption) rows of a .csv (header with "file" and "caption") or .jsonl manifest; a bad row is
  (its "manifest:row" id, BadRecord), so it is reported with the skipped records."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"caption manifest not found: {path}")
  if not path.endswith((".csv", ".jsonl")):
    raise ValueError(f"caption manifest {path} must end in .csv or .jsonl")
  with open(path, encoding="utf-8-sig", newline="") as f:
    if path.endswith(".csv"):
      reader = csv.DictReader(f)
      if not {"file", "caption"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{path}: the header needs the columns \"file\" and \"caption\", has {reader.fieldnames}")
      rows = [(i, row) for i, row in enumerate(reader, start=2)]
    else:
      rows = []
      for i, line in enumerate(f, start=1):
        if line.strip():
          try:
            rows.append((i, json.loads(line)))
          except (json.JSONDecodeError, RecursionError) as e:
            rows.append((i, BadRecord(f"invalid JSON line: {e}")))
  items, name = [], os.path.basename(path)
  for i, row in rows:
    if isinstance(row, BadRecord):
      items.append((f"{name}:{i}", row))
    elif not isinstance(row, dict) or not isinstance(row.get("file"), str) or "caption" not in row:
      items.append((f"{name}:{i}", BadRecord('missing fields: a row needs a "file" path and a "caption"')))
    else:
      items.append((row["file"], row["caption"]))
  return items


class JsonLines:
  """Lines of a .jsonl file as raw bytes (decoded per record, so one bad line is one skipped record). The
  byte offset of every `stride`-th line is kept, so reading from a multiple of `stride` seeks directly."""

  def __init__(self, path: str, split: str, stride: int):
    self.path, self.split, self.stride = os.path.expanduser(path), split, stride
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"file not found: {path}")
    self.offsets, self.lines = [], 0
    with open(self.path, "rb") as f:
      offset = 0
      for line in f:
        if self.lines % stride == 0:
          self.offsets.append(offset)
        offset += len(line)
        self.lines += 1
    if not self.lines:
      raise ValueError(f"{path} is empty")

  def splits(self) -> list[str]:
    return [self.split]

  def count(self, split: str) -> int:
    return self.lines

  def fingerprint(self, split: str) -> str:
    return f"{self.lines} lines, {os.path.getsize(self.path)} bytes"

  def read_lines(self, start: int, stop: int) -> Iterator[tuple[str, bytes]]:
    with open(self.path, "rb") as f:
      f.seek(self.offsets[start // self.stride])
      for _ in range(start % self.stride):
        f.readline()
      for lineno in range(start + 1, stop + 1):
        yield f"{os.path.basename(self.path)}:{lineno}", f.readline()

  @staticmethod
  def parse(line: bytes) -> dict:
    if not line.strip():
      raise BadRecord("blank line")
    try:
      record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise BadRecord(f"invalid JSON line: {e}") from e
    if not isinstance(record, dict):
      raise BadRecord("a JSON line must hold an object")
    return record


class TextJsonl(JsonLines):
  kind = "text"

  def read(self, split: str, start: int, stop: int):
    for id_, line in self.read_lines(start, stop):
      try:
        record = self.parse(line)
        yield id_, record["text"] if "text" in record else BadRecord('no "text" field')
      except BadRecord as e:
        yield id_, e


class EditJsonl(JsonLines):
  kind = "edit"

  def read(self, split: str, start: int, stop: int):
    root = os.path.dirname(self.path)
    for id_, line in self.read_lines(start, stop):
      yield id_, (root, line)


class Tfds:
  """A TFDS dataset read through tfds.data_source. Keys name features, "/" goes into nested ones; a list of
  captions (e.g. coco_captions' captions/text) gives its first non-empty caption."""

  def __init__(self, name: str, splits: str, data_dir: str, kind: str, image_key: str, caption_key: str,
               text_key: str):
    self.kind, self.keys = kind, dict(image=image_key, caption=caption_key, text=text_key)
    self.sources = {split: tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir))
                    for split in [s.strip() for s in splits.split(",") if s.strip()]}

  def splits(self) -> list[str]:
    return list(self.sources)

  def count(self, split: str) -> int:
    return len(self.sources[split])

  def fingerprint(self, split: str) -> str:
    return f"{len(self.sources[split])} examples"

  def read(self, split: str, start: int, stop: int):
    source = self.sources[split]
    for index in range(start, stop):
      example = source[index]
      id_ = f"{split}[{index}]"
      if self.kind == "text":
        yield id_, _feature(example, self.keys["text"])
      else:
        yield id_, (_feature(example, self.keys["image"]), _first_caption(_feature(example, self.keys["caption"])))


def _feature(example, key: str):
  for part in key.split("/"):
    if part not in example:
      raise KeyError(f"TFDS example has no feature {key!r} (features: {sorted(example)})")
    example = example[part]
  return example


def _first_caption(value):
  if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
    return next((v for v in value if (v.strip() if isinstance(v, (bytes, str)) else v)), b"")
  return value


# ----------------------------------------------------------------------------------------------
# Raw example -> record (see tfusion.data.prepared for the record formats).
# ----------------------------------------------------------------------------------------------
def text_record(raw, tokenizer) -> dict:
  return {"ids": np.asarray(tokenizer.encode(decode_text(raw, "text")), np.int32)}


def image_caption_record(raw, image_size: int, min_size: int) -> dict:
  image, caption = raw
  caption = decode_text(caption, "caption")
  return {"caption": caption.encode("utf-8"), "image": load_image(image, image_size, min_size)}


def edit_record(raw, image_size: int, min_size: int) -> dict:
  root, line = raw
  record = JsonLines.parse(line)
  missing = [k for k in ("input", "instruction", "output") if k not in record]
  if missing:
    raise BadRecord(f"missing fields: {missing}")
  for key in ("input", "output"):
    if not isinstance(record[key], str):
      raise BadRecord(f"missing fields: {key} is a {type(record[key]).__name__}, not an image path")
  return {"instruction": decode_text(record["instruction"], "instruction").encode("utf-8"),
          "input_image": load_image(os.path.join(root, record["input"]), image_size, min_size),
          "output_image": load_image(os.path.join(root, record["output"]), image_size, min_size)}
