"""The VAE train state, loss and step (paper §4.1, App. A; Esser et al. 2021).

  L_VAE = w_l1 L1 + w_lpips LPIPS + w_gan L_GAN + w_id L_ID + w_kl KL      (paper: 1, 1, 0.5, 0.2, 1e-6)
  L_VQ  = the same with w_codebook L_codebook in place of w_kl KL           (paper: w_codebook 1, beta 0.25)

L1 is the mean absolute error over pixels in [-1, 1]; LPIPS the mean perceptual distance (frozen VGG16
features) and L_ID the MoCo v2 feature distance (frozen ResNet-50), each only when its weights file is
given (the frozen networks' params are a step argument, `frozen`, keyed "lpips" / "moco"); KL is summed
over latent dimensions and averaged over images,
as in LDM, so 1e-6 gives it a small but real pull; L_GAN = -mean D(reconstruction) with a fixed weight.
The patch discriminator trains with the hinge loss on real images vs reconstructions in the same jitted
step; before `gan_start_step` the step leaves both adversarial terms out (a second program).

The VQ-VAE (vae.VQModel; models/quantizer.py for L_codebook) keeps a VQState: after each update, codes chosen by
none of the last `codebook_restart_steps` batches are restarted at encoder outputs of the batch (the codebook rows
are overwritten; their Adam moments, ~0 after that many zero gradients, are kept). Its metrics add the two
L_codebook terms, the fraction of codes used in the batch and in the restart window, and the code perplexity.
"""
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import sharding
from tfusion.evaluation import metrics as eval_metrics
from tfusion.models import (discriminator as disc_lib, lpips as lpips_lib, moco as moco_lib, quantizer,
                            vae as vae_lib)


@flax.struct.dataclass
class VAEState:
  step: jax.Array
  params: Any             # the autoencoder
  opt_state: Any
  disc_params: Any        # the patch discriminator
  disc_opt_state: Any


@flax.struct.dataclass
class VQState(VAEState):
  code_age: jax.Array     # [codebook_size] int32: batches since each code was last chosen


@dataclasses.dataclass(frozen=True)
class LossWeights:
  l1: float
  kl: float
  lpips: float
  gan: float
  moco: float
  codebook: float
  commitment_beta: float

  @classmethod
  def of(cls, loss_config) -> "LossWeights":
    return cls(loss_config.l1_weight, loss_config.kl_weight, loss_config.lpips_weight, loss_config.gan_weight,
               loss_config.moco_weight, loss_config.codebook_weight, loss_config.commitment_beta)


PERCEPTUAL = {"lpips": lpips_lib.LPIPS(), "moco": moco_lib.IdentityLoss()}   # frozen distance networks


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with linear warmup to optim.lr, then constant, and global-norm clipping."""
  schedule = optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
  return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip),
                     optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2))


def init_fn(vae: vae_lib.AutoencoderKL | vae_lib.VQModel, disc: disc_lib.PatchDiscriminator, tx, image_size: int):
  """init(key) -> VAEState (VQState for a VQModel) with boxed (logically named) params, for
  sharding.create_sharded."""
  def init(key):
    vae_key, disc_key = jax.random.split(key)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = vae.init(vae_key, images)["params"]
    disc_params = disc.init(disc_key, images)["params"]
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), disc_params=disc_params,
                  disc_opt_state=tx.init(disc_params))
    if isinstance(vae, vae_lib.VQModel):
      return VQState(**fields, code_age=jnp.zeros(vae.codebook_size, jnp.int32))
    return VAEState(**fields)
  return init


def psnr(images, reconstructions):
  """Mean PSNR in dB of uint8-range images; inputs in [-1, 1] [B, H, W, 3] (quantised to 8 bits first)."""
  def to_pixels(x):
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0, 255))
  return eval_metrics.psnr(to_pixels(images), to_pixels(reconstructions))


def autoencoder_loss(params, disc_params, frozen, images, key, *, vae, disc, weights, adversarial):
  """(L_VAE, (metrics, reconstructions, quantised)); images float [B, H, W, 3] in [-1, 1]; frozen: {name:
  params} of the PERCEPTUAL networks in use; quantised: a VQModel's (z_e [B, h, w, vq_dim], codes int32
  [B, h, w]), None for the KL-VAE (whose posterior sample draws from `key`)."""
  if isinstance(vae, vae_lib.VQModel):
    reconstructions, z_e, z_q, codes = vae.apply({"params": params}, images)
    codebook, commitment = quantizer.vq_losses(z_e, z_q, weights.commitment_beta)
    regulariser, metrics = weights.codebook * (codebook + commitment), dict(codebook=codebook, commitment=commitment)
    quantised = z_e, codes
  else:
    reconstructions, mean, logvar = vae.apply({"params": params}, images, key)
    kl = jnp.mean(vae_lib.kl_divergence(mean, logvar))
    regulariser, metrics, quantised = weights.kl * kl, dict(kl=kl), None
  l1 = jnp.mean(jnp.abs(images - reconstructions))
  loss = weights.l1 * l1 + regulariser
  metrics = dict(l1=l1, **metrics)
  for name, network_params in frozen.items():
    distance = jnp.mean(PERCEPTUAL[name].apply({"params": jax.lax.stop_gradient(network_params)}, images,
                                               reconstructions))
    loss += getattr(weights, name) * distance
    metrics[name] = distance
  if adversarial:
    gan = disc_lib.generator_adversarial_loss(disc.apply({"params": disc_params}, reconstructions))
    loss += weights.gan * gan
    metrics["gan"] = gan
  return loss, (metrics, reconstructions, quantised)


def restart_unused_codes(params, code_age, quantised, key, after: int):
  """(params, code_age, metrics) after a VQ step: quantizer.restart_unused on params' codebook; metrics: the
  fraction of codes used in the batch (codebook_usage) and in the last `after` batches (codebook_usage_window),
  and the perplexity of the batch's codes (codebook_perplexity)."""
  z_e, codes = quantised
  codebook = params["quantize"]["embedding"]
  counts = quantizer.code_counts(codes, codebook.shape[0])
  usage, perplexity = quantizer.usage_and_perplexity(counts)
  codebook, code_age, window_usage = quantizer.restart_unused(codebook, code_age, counts,
                                                               z_e.reshape(-1, z_e.shape[-1]), key, after)
  params = {**params, "quantize": {**params["quantize"], "embedding": codebook}}
  return params, code_age, dict(codebook_usage=usage, codebook_usage_window=window_usage,
                                codebook_perplexity=perplexity)


def train_step(state: VAEState, images, frozen, *, vae, disc, tx, weights, train_key, adversarial,
               codebook_restart_steps: int | None = None):
  """One update of the autoencoder and, when adversarial, of the discriminator. images uint8 [B, H, W, 3].
  A VQState (VQModel) also restarts the codes unused for codebook_restart_steps batches."""
  images = images.astype(jnp.float32) / 127.5 - 1.0
  key = jax.random.fold_in(train_key, state.step)
  grad_fn = jax.value_and_grad(autoencoder_loss, has_aux=True)
  (loss, (metrics, reconstructions, quantised)), grads = grad_fn(
      state.params, state.disc_params, frozen, images, key, vae=vae, disc=disc, weights=weights,
      adversarial=adversarial)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  extra = {}
  if isinstance(state, VQState):
    if codebook_restart_steps is None:
      raise ValueError("a VQ-VAE step needs codebook_restart_steps")
    params, extra["code_age"], vq_metrics = restart_unused_codes(params, state.code_age, quantised, key,
                                                                 codebook_restart_steps)
    metrics.update(vq_metrics)
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if adversarial:
    fake = jax.lax.stop_gradient(reconstructions)

    def disc_loss(p):
      return disc_lib.hinge_discriminator_loss(disc.apply({"params": p}, images), disc.apply({"params": p}, fake))

    d_loss, d_grads = jax.value_and_grad(disc_loss)(disc_params)
    d_updates, disc_opt_state = tx.update(d_grads, disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    metrics["disc_loss"] = d_loss
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), psnr=psnr(images, reconstructions))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
                       disc_opt_state=disc_opt_state, **extra), metrics


def jit_train_step(mesh, state_shardings, *, adversarial, **kwargs):
  """train_step jitted with explicit shardings: image rows over (data, fsdp), frozen networks replicated,
  state donated."""
  step = functools.partial(train_step, adversarial=adversarial, **kwargs)

  def run(state, images, frozen):
    with nn.logical_axis_rules(sharding.RULES):
      return step(state, images, frozen)

  return jax.jit(run, in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
