"""Small builders and checks shared by the tests."""
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec
import numpy as np

from tfusion.data import sequence

SPECIAL = sequence.SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)


def packed_rows(layout: sequence.RowLayout, documents_per_row: list[list[list]], num_timesteps=1000) -> dict:
  """Stack rows built from lists of documents into a batch dict of numpy arrays."""
  rows = []
  for documents in documents_per_row:
    row = sequence.RowBuilder(layout, SPECIAL, num_timesteps)
    for pieces in documents:
      row.add(pieces)
    rows.append(row.arrays())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def image_doc(layout, caption=(10, 11, 12), caption_first=True, seed=0):
  latents = np.random.default_rng(seed).standard_normal(layout.latent_shape).astype(np.float32)
  return sequence.image_caption_document(list(caption), latents, caption_first, SPECIAL, 1000, 500)


def text_doc(length, start=20):
  return [sequence.TextPiece(np.arange(start, start + length, dtype=np.int32))]


def logically_partitioned_params(variables) -> list:
  """The boxed params of init variables, asserting every leaf carries one logical name per dimension and
  the partition specs mirror them."""
  assert set(variables) == {"params"}
  boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert boxed and all(isinstance(v, nn.Partitioned) for v in boxed)     # no bare arrays
  specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=lambda v: isinstance(v, PartitionSpec))
  assert len(specs) == len(boxed)
  for spec, v in zip(specs, boxed):
    assert isinstance(spec, PartitionSpec) and len(spec) == len(v.names) == v.value.ndim
    assert all(isinstance(name, str) for name in v.names)
  return boxed


def set_fields(config, values: dict):
  """`config` with each value of {"group.field": value} set (also top-level "field"); returns it."""
  for key, value in values.items():
    *groups, last = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[last] = value
  return config


def raising(error: BaseException):
  """A stand-in for any function or method: it raises `error`, whatever it is called with."""
  def fail(*args, **kwargs):
    raise error
  return fail
