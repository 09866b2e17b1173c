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
    def dense(name, axes):
      return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
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


DECODER_HEADS = ("linear", "adaln_zero")


def _dense(features, name, axes, init, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class LinearPatchDecoder(nn.Module):
  """Dense(d_model -> p), zero-initialised so the first prediction is 0.  h: [B, M, n, D] -> [B, M, n, p].

  Options (each zero-initialised, so a fresh decoder outputs 0 as the paper's does):
    head "adaln_zero": DiT's final layer: LayerNorm, then a shift and scale computed from the timestep
      embedding (t [B, M]), before the Dense.
    skip: adds g(t) * noisy_patches [B, M, n, p], a per-channel gain g from the timestep embedding: the
      noisy input reaches the output without passing through the transformer's normalised stream.
  """
  patch_dim: int
  head: str = "linear"
  skip: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, t=None, noisy_patches=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    zeros = nn.initializers.zeros
    d_model = h.shape[-1]
    if self.head == "adaln_zero":
      temb = nn.silu(TimestepEmbedding(d_model, name="head_timestep_embedding", **kw)(t))
      shift, scale = jnp.split(_dense(2 * d_model, "modulation", ("time_hidden", "embed"), zeros, **kw)(temb), 2, axis=-1)
      h = nn.LayerNorm(use_bias=False, use_scale=False, name="head_norm", **kw)(h)
      h = h * (1 + scale[:, :, None, :]) + shift[:, :, None, :]
    out = _dense(self.patch_dim, "proj", ("embed", "patch"), zeros, **kw)(h)
    if self.skip:
      temb = nn.silu(TimestepEmbedding(self.patch_dim, name="skip_timestep_embedding", **kw)(t))
      gain = _dense(self.patch_dim, "skip_gain", ("time_hidden", "patch"), zeros, **kw)(temb)
      out = out + gain[:, :, None, :] * noisy_patches.astype(out.dtype)
    return out
