"""Prepared datasets: what `python -m tfusion.prepare` writes and training reads.

  <dir>/manifest.json      kind, image size, tokenizer and codec, and per split its shards (file, examples,
                           bytes, sha256), skipped records by reason, and a content hash over all shards
  <dir>/<split>-00003-of-00012.array_record   one msgpack dict per record, by kind:
      text           {"ids": int32 [n]}  sentencepiece ids of one document, no BOS / EOS
      image_caption  {"caption": utf-8 bytes, "image": uint8 [S, S, 3] | "latents": float32 [h, w, c] |
                      "codes": int32 [h, w] (prepared with a VQ-VAE)}
      edit           {"instruction": utf-8 bytes, "input_image", "output_image" | "input_latents", "output_latents"}
  <dir>/<shard>.json       a finished shard: its counts, hash and skipped records (resuming skips it)
  <dir>/skipped.jsonl      every skipped record: split, id (file, line or index) and reason
  <dir>/tokenizer.model    text: the tokenizer of the ids
  <dir>/codec.json         latents: the VAE, and the per-channel shift / scale of the train split's raw latents;
                           codes: the VQ-VAE, and the codes the train split uses

Latents are the VAE's raw posterior means; training normalises them with codec.json.
"""
import json
import os

from array_record.python import array_record_data_source
from flax import serialization

MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
KINDS = ("text", "image_caption", "edit")


def shard_file(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(record: dict) -> bytes:
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict:
  return serialization.msgpack_restore(data)


def read_manifest(path: str) -> dict:
  """The manifest of a prepared directory; errors name the directory and what is missing."""
  file = os.path.join(os.path.expanduser(path), MANIFEST)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} is not a prepared dataset (no {MANIFEST}): run python -m tfusion.prepare, "
                            "or let an interrupted one finish")
  with open(file) as f:
    manifest = json.load(f)
  if manifest.get("kind") not in KINDS:
    raise ValueError(f"{file}: kind {manifest.get('kind')!r} is not one of {KINDS}")
  return manifest


class PreparedSource:
  """Random-access records of one split of a prepared directory (dicts of numpy arrays and bytes)."""

  def __init__(self, path: str, split: str):
    self.path = os.path.expanduser(path)
    self.manifest = read_manifest(self.path)
    self.kind = self.manifest["kind"]
    splits = self.manifest["splits"]
    if split not in splits:
      raise ValueError(f"prepared dataset {path} has no split {split!r}, only {sorted(splits)}")
    shards = [os.path.join(self.path, s["file"]) for s in splits[split]["shards"] if s["examples"]]
    if not shards:
      raise ValueError(f"split {split!r} of prepared dataset {path} has no examples")
    self._records = array_record_data_source.ArrayRecordDataSource(shards)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index])

  def __getitems__(self, indices) -> list[dict]:
    return [decode_record(r) for r in self._records.__getitems__(list(indices))]
