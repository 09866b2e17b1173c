"""Device mesh and logical-axis rules: how parameters and activations are laid out on devices.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (Megatron-style: attention heads and MLP hidden units split). Modules name their
axes logically; RULES maps those names onto mesh axes.
"""
import math

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from tfusion.config import ConfigError
from tfusion.models.transformer import even_spec

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("time", None),
    ("time_hidden", None),
    ("conv_height", None),
    ("conv_width", None),
    ("unet_in", None),
    ("unet_out", "fsdp"),
    ("vae_in", None),
    ("vae_out", "fsdp"),
    ("vq_codes", None),
    ("vq_dim", None),
)


_UNITS = {"ici": "devices per slice", "dcn": "slices (TPU slices, or processes elsewhere)"}


def _resolve(sizes: list[int], total: int, kind: str) -> tuple[int, ...]:
  """Replace one -1 in `sizes` with what remains of `total`; check the product."""
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of config.mesh.{kind}_*_parallelism may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if total % known:
    raise ValueError(f"config.mesh.{kind}_* sizes {sizes} do not divide the {total} {_UNITS[kind]}")
  sizes = [total // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != total:
    raise ValueError(f"config.mesh.{kind}_* sizes {sizes} use {math.prod(sizes)}, but there are {total} "
                     f"{_UNITS[kind]}")
  return tuple(sizes)


def mesh_shape(mesh_config, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape) over (data, fsdp, tensor): ici within a slice, dcn across slices.

  A slice is a TPU slice, or a host on GPU/CPU clusters; the full mesh is their elementwise product.
  """
  dcn = _resolve([mesh_config[f"dcn_{a}_parallelism"] for a in MESH_AXES], num_slices, "dcn")
  ici = _resolve([mesh_config[f"ici_{a}_parallelism"] for a in MESH_AXES], num_devices // num_slices, "ici")
  return ici, dcn


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), laid out for the interconnect.

  Within a slice, mesh_utils orders devices along the physical torus/NVLink domains; across slices
  (config dcn_* > 1) the slow axis is split over TPU slices, or over processes elsewhere.
  """
  devices = jax.devices() if devices is None else devices
  multi_slice = any(mesh_config[f"dcn_{a}_parallelism"] != 1 for a in MESH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  by_slice = len(slices) > 1              # TPU multi-slice; otherwise processes are the slow granule
  num_slices = 1
  if multi_slice:
    num_slices = len(slices) if by_slice else len({d.process_index for d in devices})
  ici, dcn = mesh_shape(mesh_config, len(devices), num_slices)
  if multi_slice:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, contiguous_submeshes=False)
  return Mesh(grid, MESH_AXES)


def logical_shardings(mesh: Mesh, tree):
  """NamedShardings for a tree of logically-partitioned abstract values (from jax.eval_shape).

  A dimension the rules would split unevenly (e.g. 3 latent channels over 8 devices) stays whole.
  """
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, RULES)
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return jax.tree.map(_drop_uneven_splits, values, shardings)


def _drop_uneven_splits(value, named: NamedSharding) -> NamedSharding:
  return NamedSharding(named.mesh, even_spec(value.shape, named.spec, named.mesh.shape))


def check_batch_size(mesh: Mesh, batch_size: int, microbatches: int = 1) -> None:
  """ConfigError unless every microbatch splits evenly over the data shards (mesh data x fsdp) and the batch
  over the processes."""
  shards = data_shards(mesh)
  if (batch_size // microbatches) % shards or batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size = {batch_size}: batch_size / microbatches must be divisible by the "
                      f"{shards} data shards (mesh data x fsdp), and batch_size by the {jax.process_count()} "
                      "processes")


def data_shards(mesh: Mesh) -> int:
  """How many ways batch rows are split: mesh data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def pad_rows(rows, multiple: int, fill=None):
  """rows (a list, or an array along its first axis) padded at the end to a multiple of `multiple` with copies of
  `fill` (default: the last row), so that every batch has the shape one compilation, or the devices, need."""
  missing = -len(rows) % multiple
  if not missing:
    return rows
  if isinstance(rows, np.ndarray):
    return np.concatenate([rows, np.repeat(rows[-1:] if fill is None else fill[None], missing, 0)])
  return list(rows) + [rows[-1] if fill is None else fill] * missing


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of every batch array are split over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings, e.g. the restore target of a checkpointed tree."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_init(init, mesh: Mesh):
  """(tree of ShapeDtypeStructs carrying their shardings, shardings) of init(key) -> a boxed tree (params or a
  train state); nothing is allocated. The shardings come from the logical axis names of the boxed values."""
  key = jax.random.key(0)   # made outside the mesh context: the mesh may be of devices we cannot run on
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    boxed = jax.eval_shape(init, key)
    shardings = logical_shardings(mesh, boxed)
  return abstract_like(nn.meta.unbox(boxed), shardings), shardings


def create_sharded(init, key: jax.Array, mesh: Mesh):
  """(tree, shardings): init(key) computed directly into the shardings of its logical axis names."""
  _, shardings = abstract_init(init, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    tree = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)
  return tree, shardings
