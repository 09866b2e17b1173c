"""The loss and the train step: L = mean CE over text targets + lambda * mean per-image decoder MSE
[+ w * mean over text targets of log(Z)^2].

The decoder MSE is the paper's eps MSE, or with diffusion.prediction = v the v MSE, optionally weighted per
image by Min-SNR-gamma (diffusion.loss_weights). The z-loss term (objective.z_loss, weight config.z_loss_weight)
is Chameleon's; with w = 0 (Transfusion) it is not computed. The metrics hold each term's mean unweighted:
loss = text_loss + lambda * image_loss [+ w * z_loss].

One jax.jit covers noising, the forward pass, both losses, gradients and the optimizer update. With
gradient accumulation the batch runs as sequential microbatches whose summed losses are divided by
the whole batch's text-target and image counts, so the update equals the one-batch update.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import diffusion, objective, sharding
from tfusion.training.state import TrainState


def draw_noise(key, batch):
  """One timestep per image, uniform in [1, t_max], and Gaussian noise on the whole latent.

  -> (t [B, M] int32, eps [B, M, h, w, c] float32).
  """
  t_key, eps_key = jax.random.split(key)
  return (diffusion.sample_timesteps(t_key, batch["t_max"]),
          jax.random.normal(eps_key, batch["latents"].shape, jnp.float32))


def loss_sums(params, batch, t, eps, *, model, alpha_bar, min_snr_gamma=0.0, z_loss=False):
  """A batch's loss sums: {"text": CE summed over text targets, "image": weighted per-image decoder MSE summed over
  real images, and with z_loss "z": log(Z)^2 summed over text targets}."""
  prediction = model.cfg.prediction
  logits, output, _ = objective.forward(params, batch, t, eps, model=model, alpha_bar=alpha_bar)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, objective.text_targets(batch["tokens"]))
  sums = dict(text=(ce * batch["text_loss_mask"]).sum())
  target = diffusion.prediction_target(prediction, batch["latents"], eps, alpha_bar[t])
  per_image = jnp.mean(jnp.square(output - target), axis=(2, 3, 4))   # [B, M]
  per_image *= diffusion.loss_weights(prediction, alpha_bar[t], min_snr_gamma)
  sums["image"] = (per_image * batch["image_valid"]).sum()
  if z_loss:
    sums["z"] = (objective.z_loss(logits) * batch["text_loss_mask"]).sum()
  return sums


def microbatch_slices(tree, k):
  """[B, ...] -> [k, B / k, ...] where slice j holds rows j, j + k, ...: every device keeps its own
  rows (rows are split over devices in contiguous blocks), so slicing moves no data."""
  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, "batch"))
  return jax.tree.map(split, tree)


def loss_and_grads(params, batch, key, *, model, alpha_bar, loss_weight, min_snr_gamma=0.0, z_loss_weight=0.0,
                   microbatches=1):
  """Returns (metrics, grads) of L = text_sum / num_targets + lambda * image_sum / num_images
  [+ z_loss_weight * z_sum / num_targets when z_loss_weight > 0]."""
  t, eps = draw_noise(key, batch)
  num_targets = batch["text_loss_mask"].sum().astype(jnp.float32)
  num_images = batch["image_valid"].sum().astype(jnp.float32)
  text_scale, image_scale = 1.0 / jnp.maximum(num_targets, 1.0), loss_weight / jnp.maximum(num_images, 1.0)

  def scaled_loss(params, inputs):
    sums = loss_sums(params, *inputs, model=model, alpha_bar=alpha_bar, min_snr_gamma=min_snr_gamma,
                     z_loss=z_loss_weight > 0)
    loss = sums["text"] * text_scale + sums["image"] * image_scale
    if z_loss_weight > 0:
      loss = loss + sums["z"] * (z_loss_weight * text_scale)
    return loss, sums

  grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)
  if microbatches == 1:
    (loss, sums), grads = grad_fn(params, (batch, t, eps))
  else:
    def accumulate(carry, inputs):
      (loss, sums), grads = grad_fn(params, inputs)
      return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros(()), dict.fromkeys(("text", "image") + (("z",) if z_loss_weight > 0 else ()), jnp.zeros(())),
            zeros)
    (loss, sums, grads), _ = jax.lax.scan(accumulate, init, microbatch_slices((batch, t, eps), microbatches))
  metrics = dict(loss=loss, text_loss=sums["text"] / jnp.maximum(num_targets, 1.0),
                 image_loss=sums["image"] / jnp.maximum(num_images, 1.0), text_targets=num_targets, images=num_images)
  if z_loss_weight > 0:
    metrics["z_loss"] = sums["z"] / jnp.maximum(num_targets, 1.0)
  return metrics, grads


def ema_update(ema_params, params, step, decay: float):
  """EMA of the params after `step` updates, with the decay warmed up as min(decay, (1 + step) / (10 + step)),
  so early averages do not hold on to the random initialisation."""
  step = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1 + step) / (10 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, alpha_bar, loss_weight, train_key,
               min_snr_gamma=0.0, z_loss_weight=0.0, ema_decay=0.0, microbatches=1):
  """One optimizer step. The step's randomness is fold_in(train_key, step): resumable exactly."""
  key = jax.random.fold_in(train_key, state.step)
  metrics, grads = loss_and_grads(state.params, batch, key, model=model, alpha_bar=alpha_bar,
                                  loss_weight=loss_weight, min_snr_gamma=min_snr_gamma, z_loss_weight=z_loss_weight,
                                  microbatches=microbatches)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = ema_update(ema_params, params, state.step, ema_decay)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 elements=(batch["segment_ids"] > 0).sum())
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params), metrics


def jit_train_step(mesh, state_shardings, *, model, tx, schedule, alpha_bar, loss_weight, train_key,
                   min_snr_gamma=0.0, z_loss_weight=0.0, ema_decay=0.0, microbatches=1):
  """train_step jitted with explicit shardings: batch rows over (data, fsdp), state donated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           alpha_bar=jnp.asarray(alpha_bar, jnp.float32), loss_weight=loss_weight,
                           train_key=train_key, min_snr_gamma=min_snr_gamma, z_loss_weight=z_loss_weight,
                           ema_decay=ema_decay, microbatches=microbatches)

  def run(state, batch):
    with nn.logical_axis_rules(sharding.RULES):
      return step(state, batch)

  return jax.jit(run, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
