"""Run a per-image network on the images a batch holds, not on its empty image slots.

A packed batch has M image slots per row, and rows hold fewer images than that. A per-image network
(the U-Net patch encoder and decoder) costs as much on an empty slot as on an image, so under static
shapes it would run on all B x M slots. Here the slots of each batch shard are put in order, present
ones first, and the network runs on them `chunk` slots at a time in a `lax.scan`; a `lax.cond` skips
every chunk that holds no present slot (on TPU, GPU and CPU alike: a cond in a loop is control flow).
So a shard pays for its present images rounded up to the chunk, plus the sort and the gathers.

XLA's TPU cost model cannot see a cond's predicate, so `optimal_seconds` still prices every chunk. On
XLA:CPU a convolution's weight gradient under control flow (a cond, or a scan's backward pass) misses the
fast kernels and runs about 20x slower, so there this costs more than the empty slots it skips
(`model.unet_skip_empty_slots`, off by default; docs/results.md).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models import transformer


def images_in_rows(image_ids, patches_per_image: int):
  """image_ids [B, L] (0: not a patch) -> [B] int, the images whose patches the rows hold."""
  patches = (image_ids > 0).sum(axis=1)
  return (patches + patches_per_image - 1) // patches_per_image


def present_slots(image_ids, num_slots: int, patches_per_image: int):
  """[B, L] -> [B, num_slots] bool: slot m of a row is present when the row holds more than m images
  (the k-th slot holds the row's k-th image)."""
  return jnp.arange(num_slots) < images_in_rows(image_ids, patches_per_image)[:, None]


def batch_shards(batch: int) -> int:
  """How many shards the batch axis is split into under the current mesh and logical rules (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = transformer.even_spec((batch,), nn.logical_to_mesh_axes(("batch",)), mesh.shape)[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else (axes or ())))


def map_present(fn, present, *arrays, chunk: int):
  """fn over the present slots only, `chunk` slots at a time.

  fn: arrays (pytrees of [chunk, ...]) -> pytree of [chunk, ...]; present: [B, M] bool; arrays: pytrees of
  [B, M, ...] -> fn's pytree with leaves [B, M, ...], zero at the absent slots. Slots are reordered within each
  batch shard (so no slot crosses devices), and chunks with no present slot are not computed.
  """
  batch, slots = present.shape
  shards = batch_shards(batch)
  per_shard = batch // shards * slots
  chunk = min(chunk, per_shard)
  padded = -(-per_shard // chunk) * chunk
  chunks = padded // chunk

  def to_shards(a, fill=0):                         # [B, M, ...] -> [shards, padded, ...]
    a = a.reshape(shards, per_shard, *a.shape[2:])
    return jnp.pad(a, [(0, 0), (0, padded - per_shard)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)

  flags = to_shards(present, False)
  order = jnp.argsort(~flags, axis=1, stable=True)                     # present slots first, in their order
  gather = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
  to_chunks = lambda a: jnp.swapaxes(a.reshape(shards, chunks, chunk, *a.shape[2:]), 0, 1)  # noqa: E731
  inputs = jax.tree.map(lambda a: to_chunks(gather(to_shards(a), order)), arrays)  # [chunks, shards, chunk, ...]
  busy = to_chunks(gather(flags, order)).any(axis=(1, 2))              # [chunks]: a shard has a present slot

  def run(a):                                                          # [shards, chunk, ...] each
    out = fn(*jax.tree.map(lambda x: x.reshape(shards * chunk, *x.shape[2:]), a))
    return jax.tree.map(lambda y: y.reshape(shards, chunk, *y.shape[1:]), out)

  shapes = jax.eval_shape(run, jax.tree.map(lambda x: x[0], inputs))
  skip = lambda a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
  _, outputs = jax.lax.scan(lambda _, xs: (None, jax.lax.cond(xs[0], run, skip, xs[1])), None, (busy, inputs))

  inverse = jnp.argsort(order, axis=1)

  def back(y):                                                         # [chunks, shards, chunk, ...] -> [B, M, ...]
    y = gather(jnp.swapaxes(y, 0, 1).reshape(shards, padded, *y.shape[3:]), inverse)[:, :per_shard]
    y = y.reshape(batch, slots, *y.shape[2:])
    return jnp.where(present.reshape(batch, slots, *(1,) * (y.ndim - 2)), y, 0)
  return jax.tree.map(back, outputs)


def apply_present(module: nn.Module, present, *arrays, chunk: int):
  """module(*arrays) on the present slots only (map_present), for a submodule of the calling Linen module.

  At initialisation the module runs on every slot (creating its parameters); afterwards it is applied
  with its own parameters inside the scan, as a pure function. arrays: pytrees of [B, M, ...], as the module
  takes them -> its outputs, zero at the absent slots.
  """
  if module.is_initializing():
    return module(*arrays)
  params = module.variables["params"]
  detached = module.clone(parent=None)
  flat = lambda a: a[:, None]  # noqa: E731   each chunk as [chunk, 1, ...]: the module's [B, M, ...] layout

  def fn(*chunk_arrays):
    out = detached.apply({"params": params}, *jax.tree.map(flat, chunk_arrays))
    return jax.tree.map(lambda y: y[:, 0], out)
  return map_present(fn, present, *arrays, chunk=chunk)
