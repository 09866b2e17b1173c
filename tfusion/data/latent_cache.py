"""Cached VAE latents: a dataset encoded once, so training never runs the VAE encoder.

A cache directory holds one array_record file per split, `<split>.array_record`, whose records are
msgpack dicts {"caption": utf-8 bytes, "latents": float32 [h, w, c]} (the raw posterior means, in the
order of the image source) or, with a VQ-VAE, {"caption", "codes": int32 [h, w]}, and `codec.json`: the VAE it was encoded with, the per-channel shift and
scale measured on the train split, the range of the normalised latents there, and the record counts. codec.json is written last, so a cache
without it is incomplete and is encoded again.
"""
import os

from array_record.python import array_record_data_source, array_record_module
from flax import serialization
import numpy as np

from tfusion import codecs, run_dir
from tfusion.data import pipeline


def split_path(cache_dir: str, split: str) -> str:
  return os.path.join(cache_dir, f"{split}.array_record")


class ChannelMoments:
  """Running per-channel count, sums (float64) and extremes of latents [..., c]: their mean, standard
  deviation and the range of the normalised latents (what the sampler clips x0 estimates to)."""

  def __init__(self, channels: int):
    self.count, self.sum, self.sum_sq = 0, np.zeros(channels), np.zeros(channels)
    self.low, self.high = np.full(channels, np.inf), np.full(channels, -np.inf)

  def add(self, latents: np.ndarray) -> None:
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    self.count += len(flat)
    self.sum += flat.sum(0)
    self.sum_sq += np.square(flat).sum(0)
    self.low, self.high = np.minimum(self.low, flat.min(0)), np.maximum(self.high, flat.max(0))

  def merge(self, other: "ChannelMoments") -> None:
    self.count += other.count
    self.sum, self.sum_sq = self.sum + other.sum, self.sum_sq + other.sum_sq
    self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)

  def to_json(self) -> dict:
    return dict(count=self.count, sum=self.sum.tolist(), sum_sq=self.sum_sq.tolist(), low=self.low.tolist(),
                high=self.high.tolist())

  @classmethod
  def from_json(cls, d: dict) -> "ChannelMoments":
    m = cls(len(d["sum"]))
    m.count, m.sum, m.sum_sq = d["count"], np.array(d["sum"]), np.array(d["sum_sq"])
    m.low, m.high = np.array(d["low"]), np.array(d["high"])
    return m

  def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    mean = self.sum / self.count
    return mean, np.sqrt(np.maximum(self.sum_sq / self.count - np.square(mean), 1e-12))

  def codec_statistics(self) -> dict:
    """codec.json's shift and scale (per channel) and value_range: the largest |normalised latent| seen."""
    shift, scale = self.mean_std()
    value_range = float(np.max(np.maximum(self.high - shift, shift - self.low) / scale))
    return dict(shift=shift.tolist(), scale=scale.tolist(), value_range=value_range)


class CodeCounts:
  """How often each code of a VQ-VAE is used: codec.json's usage (codes used at least once) and perplexity."""

  def __init__(self, codebook_size: int):
    self.counts = np.zeros(codebook_size, np.int64)

  @property
  def count(self) -> int:
    return int(self.counts.sum())

  def add(self, codes: np.ndarray) -> None:
    self.counts += np.bincount(np.asarray(codes).reshape(-1), minlength=len(self.counts))

  def merge(self, other: "CodeCounts") -> None:
    self.counts += other.counts

  def to_json(self) -> dict:
    return dict(code_counts=self.counts.tolist())

  @classmethod
  def from_json(cls, d: dict) -> "CodeCounts":
    c = cls(len(d["code_counts"]))
    c.counts = np.asarray(d["code_counts"], np.int64)
    return c

  def codec_statistics(self) -> dict:
    p = self.counts / max(self.counts.sum(), 1)
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    return dict(codes_used=int(np.count_nonzero(self.counts)), code_perplexity=perplexity)


def statistics_of(codec) -> ChannelMoments | CodeCounts:
  """The empty statistics a codec's cache records: code counts of a VqCodec, latent moments of a VaeCodec."""
  return CodeCounts(codec.codebook_size) if isinstance(codec, codecs.VqCodec) else ChannelMoments(
      codec.vae.latent_channels)


def statistics_from_json(d: dict) -> ChannelMoments | CodeCounts:
  return CodeCounts.from_json(d) if "code_counts" in d else ChannelMoments.from_json(d)


def encode_split(codec, source, path: str, batch_size: int = 256, progress=None) -> ChannelMoments | CodeCounts:
  """Encode every example of `source` (random access; example["image"] uint8 [S, S, 3], example["caption"]
  utf-8 bytes) into the array_record file `path`: raw latents with a VaeCodec (returns their moments), codes
  with a VqCodec (returns their counts)."""
  discrete = isinstance(codec, codecs.VqCodec)
  stats = statistics_of(codec)
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for start in range(0, len(source), batch_size):
      examples = pipeline.take(source, batch_size, start)
      images = np.stack([e["image"] for e in examples])
      encoded = codec.codes(images) if discrete else codec.raw_latents(images)
      stats.add(encoded)
      field = "codes" if discrete else "latents"
      for example, value in zip(examples, encoded):
        writer.write(serialization.msgpack_serialize({"caption": example["caption"], field: value}))
      if progress is not None:
        progress.update(len(examples))
  finally:
    writer.close()
  os.replace(tmp, path)
  return stats


class LatentSource:
  """Random-access examples of one cached split: {"caption": bytes, "latents": float32 [h, w, c]} or
  {"caption", "codes": int32 [h, w]}."""

  def __init__(self, cache_dir: str, split: str):
    path = split_path(cache_dir, split)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: encode the dataset first (python -m tfusion.encode_latents)")
    self.path = path
    self._records = array_record_data_source.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._records[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self._records.__getitems__(list(indices))]

  def _decode(self, record: bytes) -> dict:
    example = serialization.msgpack_restore(record)
    if "codes" in example:
      return {"caption": example["caption"], "codes": np.asarray(example["codes"], np.int32)}
    return {"caption": example["caption"], "latents": np.asarray(example["latents"], np.float32)}


def write_metadata(cache_dir: str, metadata: dict) -> None:
  run_dir.write_json(os.path.join(cache_dir, run_dir.CODEC_FILE), metadata)
