"""Device mesh and logical-axis rules: how parameters and activations are laid out on devices.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (Megatron-style: attention heads and MLP hidden units split). Modules name their
axes logically; RULES maps those names onto mesh axes.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolve the ici_* sizes (one may be -1 = the rest) into a (data, fsdp, tensor) shape."""
  sizes = [mesh_config[f"ici_{axis}_parallelism"] for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of config.mesh.ici_*_parallelism may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh sizes {sizes} do not divide the {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh sizes {sizes} use {math.prod(sizes)} devices, but {num_devices} exist")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(mesh: Mesh, tree):
  """NamedShardings for a tree of logically-partitioned abstract values (from jax.eval_shape)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of every batch array are split over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
