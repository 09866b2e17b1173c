"""The train state and its sharded initialisation."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import sharding
from tfusion.data import sequence


@flax.struct.dataclass
class TrainState:
  """step; params; opt_state; ema_params: the exponential moving average of params (None without EMA)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None

  @property
  def sampling_params(self):
    """The params samples and evaluations use: the EMA when there is one."""
    return self.params if self.ema_params is None else self.ema_params


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, ema: bool):
  def init(key):
    params = model.init(key, *sequence.model_inputs(init_batch))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)
  return init


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, mesh,
                         ema: bool = False):
  """sharding.abstract_init of the Transfusion train state; init_batch may hold abstract values."""
  return sharding.abstract_init(_init_fn(model, tx, init_batch, ema), mesh)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, key: jax.Array,
                       mesh, ema: bool = False) -> tuple[TrainState, Any]:
  """Initialise params, optimizer state (and the params' EMA) directly into their shardings on `mesh`."""
  return sharding.create_sharded(_init_fn(model, tx, init_batch, ema), key, mesh)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
