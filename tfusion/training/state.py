"""The train state and its sharded initialisation."""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import codecs, sharding
from tfusion.data import sequence
from tfusion.models import transfusion
from tfusion.training import checkpoint


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


def model_and_layout(config, vocab_size: int) -> tuple[transfusion.Transfusion, sequence.RowLayout]:
  """The Transfusion model of an experiment config and the row layout its batches follow."""
  latent_shape = codecs.latent_shape(config.data)
  model = transfusion.Transfusion(transfusion.config_from(config, vocab_size, latent_shape))
  return model, sequence.RowLayout(config.seq_len, latent_shape, config.model.patch_size)


def model_inputs(batch: dict) -> tuple:
  """The positional model inputs for a batch dict (clean latents stand in for noisy ones)."""
  return (batch["tokens"], batch["segment_ids"], batch["positions"], batch["image_ids"],
          batch["latents"], batch["t_max"])


def dummy_batch(rows: int, layout: sequence.RowLayout) -> dict:
  """Zero arrays with the batch format's shapes, for initialisation and abstract compilation."""
  z = lambda *s, dtype=jnp.int32: jnp.zeros(s, dtype)  # noqa: E731
  seq_len, max_images = layout.seq_len, layout.max_images
  return dict(tokens=z(rows, seq_len), segment_ids=z(rows, seq_len), positions=z(rows, seq_len),
              image_ids=z(rows, seq_len), text_loss_mask=z(rows, seq_len, dtype=bool),
              latents=z(rows, max_images, *layout.latent_shape, dtype=jnp.float32),
              image_valid=z(rows, max_images, dtype=bool), t_max=z(rows, max_images))


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, ema: bool):
  def init(key):
    params = model.init(key, *model_inputs(init_batch))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)
  return init


def abstract_state(init: Callable, mesh):
  """(state of ShapeDtypeStructs carrying their shardings, state_shardings) of init(key) -> boxed state;
  nothing is allocated. The shardings come from the params' logical axis names."""
  key = jax.random.key(0)   # made outside the mesh context: the mesh may be of devices we cannot run on
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    boxed = jax.eval_shape(init, key)
    shardings = sharding.logical_shardings(mesh, boxed)
  return checkpoint.abstract_like(nn.meta.unbox(boxed), shardings), shardings


def create_sharded(init: Callable, key: jax.Array, mesh) -> tuple[Any, Any]:
  """(state, state_shardings): init(key) computed directly into the shardings of its logical axis names."""
  _, shardings = abstract_state(init, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)
  return state, shardings


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, mesh,
                         ema: bool = False):
  """abstract_state of the Transfusion train state; init_batch may hold abstract values."""
  return abstract_state(_init_fn(model, tx, init_batch, ema), mesh)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, init_batch: dict, key: jax.Array,
                       mesh, ema: bool = False) -> tuple[TrainState, Any]:
  """Initialise params, optimizer state (and the params' EMA) directly into their shardings on `mesh`."""
  return create_sharded(_init_fn(model, tx, init_batch, ema), key, mesh)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
