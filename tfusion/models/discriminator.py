"""Patch-GAN discriminator (Isola et al. 2017) and hinge GAN losses, as used for VQGAN (Esser et al. 2021).

A fully convolutional stack of 4x4 convs whose output is a grid of logits, one per overlapping image patch
(70x70 pixels for the default 3 layers), each judging whether its patch is real. Unlike the original, the
normalisation is GroupNorm instead of BatchNorm: the module is a pure function of params and input, with no
mutable batch statistics to thread through training and no dependence on how the batch is sharded. Convs
followed by a norm have no bias (the norm's offset replaces it). Kernels start N(0, 0.02^2) as in pix2pix.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")
MAX_GROUPS = 32


def _conv(features, stride, name, use_bias=True):
  return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, CONV_AXES[-1:]))


def _group_norm(features, name):
  """GroupNorm with MAX_GROUPS groups, or the largest divisor of `features` below that."""
  return nn.GroupNorm(num_groups=math.gcd(MAX_GROUPS, features), name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, CONV_AXES[-1:]),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, CONV_AXES[-1:]))


class PatchDiscriminator(nn.Module):
  """conv4x4/2 -> lReLU; (num_layers - 1) x [conv4x4/2 -> GN -> lReLU]; conv4x4/1 -> GN -> lReLU; conv4x4/1 -> 1.

  Widths channels * min(2^n, 8). x: [B, H, W, 3] in [-1, 1] -> logits [B, H/2^L - 2, W/2^L - 2, 1] float32
  (L = num_layers, H and W multiples of 2^L).
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(_conv(self.channels, 2, "conv_0")(x.astype(jnp.float32)), 0.2)
    for n in range(1, self.num_layers + 1):
      width = self.channels * min(2 ** n, 8)
      x = _conv(width, 2 if n < self.num_layers else 1, f"conv_{n}", use_bias=False)(x)
      x = nn.leaky_relu(_group_norm(width, f"norm_{n}")(x), 0.2)
    return _conv(1, 1, "conv_out")(x)


def hinge_discriminator_loss(real_logits, fake_logits):
  """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))); logits of any shape -> scalar."""
  real_logits, fake_logits = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  return 0.5 * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))


def generator_adversarial_loss(fake_logits):
  """-mean(fake logits): the generator pushes the discriminator's logits on its samples up."""
  return -jnp.mean(fake_logits.astype(jnp.float32))
