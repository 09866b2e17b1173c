"""Image latents <-> transformer elements: patchify, timestep embedding, linear patch encoder/decoder.

A k x k window of latent pixels (k * k * c values, raster order) is one element of the sequence
(paper §3). The linear encoder adds a timestep embedding to each patch vector before its linear
layer (paper footnote 6).
"""
import math

import flax.linen as nn
import jax.numpy as jnp


def patchify(x, k):
  """[..., h, w, c] -> [..., (h/k) * (w/k), k * k * c], patches in raster order."""
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // k, k, w // k, k, c)
  x = jnp.moveaxis(x, -4, -3)                                  # [..., h/k, w/k, k, k, c]
  return x.reshape(*lead, (h // k) * (w // k), k * k * c)


def unpatchify(p, k, h, w):
  """Inverse of patchify: [..., n, k * k * c] -> [..., h, w, c]."""
  *lead, _, dim = p.shape
  c = dim // (k * k)
  x = p.reshape(*lead, h // k, w // k, k, k, c)
  x = jnp.moveaxis(x, -3, -4)                                  # [..., h/k, k, w/k, k, c]
  return x.reshape(*lead, h, w, c)


def timestep_features(t, dim, max_period=10_000.0):
  """Sinusoidal features of integer timesteps.  t: [...] -> [..., dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Module):
  """Sinusoidal features -> Dense -> SiLU -> Dense.  t: [...] int -> [..., features]."""
  features: int
  num_frequencies: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    dense = lambda name, axes: nn.Dense(  # noqa: E731
        self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))
    h = timestep_features(t, self.num_frequencies).astype(self.dtype)
    return dense("out", ("time_hidden", "patch"))(nn.silu(dense("hidden", ("time", "time_hidden"))(h)))


class LinearPatchEncoder(nn.Module):
  """patches + temb(t) -> Dense(d_model).  patches: [B, M, n, p]; t: [B, M] -> [B, M, n, D]."""
  d_model: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, patches, t):
    temb = TimestepEmbedding(patches.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                             name="timestep_embedding")(t)
    x = patches.astype(self.dtype) + temb[:, :, None, :]
    return nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("patch", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)


class LinearPatchDecoder(nn.Module):
  """Dense(d_model -> p), zero-initialised so the first eps prediction is 0.  [..., D] -> [..., p]."""
  patch_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.patch_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "patch")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("patch",)))(h)
