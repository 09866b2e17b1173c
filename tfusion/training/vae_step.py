"""The VAE train state, loss and step (paper §4.1, App. A; Esser et al. 2021).

  L_VAE = w_l1 L1 + w_lpips LPIPS + w_gan L_GAN + w_id L_ID + w_kl KL      (paper: 1, 1, 0.5, 0.2, 1e-6)

L1 is the mean absolute error over pixels in [-1, 1]; LPIPS the mean perceptual distance (frozen VGG16
features) and L_ID the MoCo v2 feature distance (frozen ResNet-50), each only when its weights file is
given (the frozen networks' params are a step argument, `frozen`, keyed "lpips" / "moco"); KL is summed
over latent dimensions and averaged over images,
as in LDM, so 1e-6 gives it a small but real pull; L_GAN = -mean D(reconstruction) with a fixed weight.
The patch discriminator trains with the hinge loss on real images vs reconstructions in the same jitted
step; before `gan_start_step` the step leaves both adversarial terms out (a second program).
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
from tfusion.models import discriminator as disc_lib, lpips as lpips_lib, moco as moco_lib, vae as vae_lib


@flax.struct.dataclass
class VAEState:
  step: jax.Array
  params: Any             # the autoencoder
  opt_state: Any
  disc_params: Any        # the patch discriminator
  disc_opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossWeights:
  l1: float
  kl: float
  lpips: float
  gan: float
  moco: float

  @classmethod
  def of(cls, loss_config) -> "LossWeights":
    return cls(loss_config.l1_weight, loss_config.kl_weight, loss_config.lpips_weight, loss_config.gan_weight,
               loss_config.moco_weight)


PERCEPTUAL = {"lpips": lpips_lib.LPIPS(), "moco": moco_lib.IdentityLoss()}   # frozen distance networks


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with linear warmup to optim.lr, then constant, and global-norm clipping."""
  schedule = optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
  return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip),
                     optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2))


def init_fn(vae: vae_lib.AutoencoderKL, disc: disc_lib.PatchDiscriminator, tx, image_size: int):
  """init(key) -> VAEState with boxed (logically named) params, for sharding.create_sharded."""
  def init(key):
    vae_key, disc_key = jax.random.split(key)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = vae.init(vae_key, images)["params"]
    disc_params = disc.init(disc_key, images)["params"]
    return VAEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    disc_params=disc_params, disc_opt_state=tx.init(disc_params))
  return init


def psnr(images, reconstructions):
  """Mean PSNR in dB of uint8-range images; inputs in [-1, 1] [B, H, W, 3] (quantised to 8 bits first)."""
  def to_pixels(x):
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0, 255))
  return eval_metrics.psnr(to_pixels(images), to_pixels(reconstructions))


def autoencoder_loss(params, disc_params, frozen, images, key, *, vae, disc, weights, adversarial):
  """(L_VAE, (metrics, reconstructions)); images float [B, H, W, 3] in [-1, 1]; frozen: {name: params}
  of the PERCEPTUAL networks in use."""
  reconstructions, mean, logvar = vae.apply({"params": params}, images, key)
  l1 = jnp.mean(jnp.abs(images - reconstructions))
  kl = jnp.mean(vae_lib.kl_divergence(mean, logvar))
  loss = weights.l1 * l1 + weights.kl * kl
  metrics = dict(l1=l1, kl=kl)
  for name, network_params in frozen.items():
    distance = jnp.mean(PERCEPTUAL[name].apply({"params": jax.lax.stop_gradient(network_params)}, images,
                                               reconstructions))
    loss += getattr(weights, name) * distance
    metrics[name] = distance
  if adversarial:
    gan = disc_lib.generator_adversarial_loss(disc.apply({"params": disc_params}, reconstructions))
    loss += weights.gan * gan
    metrics["gan"] = gan
  return loss, (metrics, reconstructions)


def train_step(state: VAEState, images, frozen, *, vae, disc, tx, weights, train_key, adversarial):
  """One update of the autoencoder and, when adversarial, of the discriminator. images uint8 [B, H, W, 3]."""
  images = images.astype(jnp.float32) / 127.5 - 1.0
  key = jax.random.fold_in(train_key, state.step)
  grad_fn = jax.value_and_grad(autoencoder_loss, has_aux=True)
  (loss, (metrics, reconstructions)), grads = grad_fn(
      state.params, state.disc_params, frozen, images, key, vae=vae, disc=disc, weights=weights,
      adversarial=adversarial)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
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
  return VAEState(step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
                  disc_opt_state=disc_opt_state), metrics


def jit_train_step(mesh, state_shardings, *, adversarial, **kwargs):
  """train_step jitted with explicit shardings: image rows over (data, fsdp), frozen networks replicated,
  state donated."""
  step = functools.partial(train_step, adversarial=adversarial, **kwargs)

  def run(state, images, frozen):
    with nn.logical_axis_rules(sharding.RULES):
      return step(state, images, frozen)

  return jax.jit(run, in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
