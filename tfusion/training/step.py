"""The loss and the train step: L = mean CE over text targets + lambda * mean per-image eps MSE.

One jax.jit covers noising, the forward pass, both losses, gradients and the optimizer update.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import diffusion, sharding
from tfusion.training.state import TrainState


def text_targets(tokens):
  """Next-token targets: targets[:, l] = tokens[:, l + 1] (the last column is never a target)."""
  return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def loss_fn(params, batch, key, *, model, alpha_bar, loss_weight):
  """Returns (loss, metrics). One timestep per image, uniform in [1, t_max]; noise on the whole latent."""
  t_key, eps_key = jax.random.split(key)
  x0 = batch["latents"]                                            # [B, M, h, w, c]
  t = diffusion.sample_timesteps(t_key, batch["t_max"])             # [B, M]
  eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(x0, eps, alpha_bar[t])
  logits, eps_hat = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                                batch["positions"], batch["image_ids"], x_t, t)

  text_mask = batch["text_loss_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, text_targets(batch["tokens"]))
  num_targets = text_mask.sum()
  text_loss = (ce * text_mask).sum() / jnp.maximum(num_targets, 1.0)

  image_valid = batch["image_valid"].astype(jnp.float32)
  per_image = jnp.mean(jnp.square(eps_hat - eps), axis=(2, 3, 4))   # [B, M]
  num_images = image_valid.sum()
  image_loss = (per_image * image_valid).sum() / jnp.maximum(num_images, 1.0)

  loss = text_loss + loss_weight * image_loss
  return loss, dict(loss=loss, text_loss=text_loss, image_loss=image_loss,
                    text_targets=num_targets, images=num_images)


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, alpha_bar, loss_weight, train_key):
  """One optimizer step. The step's randomness is fold_in(train_key, step): resumable exactly."""
  key = jax.random.fold_in(train_key, state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, alpha_bar=alpha_bar, loss_weight=loss_weight), has_aux=True)
  (_, metrics), grads = grad_fn(state.params, batch, key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 elements=(batch["segment_ids"] > 0).sum())
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(mesh, state_shardings, *, model, tx, schedule, alpha_bar, loss_weight, train_key):
  """train_step jitted with explicit shardings: batch rows over (data, fsdp), state donated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           alpha_bar=jnp.asarray(alpha_bar, jnp.float32), loss_weight=loss_weight,
                           train_key=train_key)

  def run(state, batch):
    with nn.logical_axis_rules(sharding.RULES):
      return step(state, batch)

  return jax.jit(run, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
