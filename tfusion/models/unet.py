"""U-Net patch encoder/decoder: the down and up blocks of an ADM-style U-Net (Nichol & Dhariwal 2021).

Paper §3: a k x k window of latent pixels becomes one transformer vector. With the U-Net option the
encoder is the U-Net's down path (log2(k) 2x downsamplings) followed by a per-position projection to
d_model; the decoder projects back, runs the up path with skip connections from the down path, and
predicts eps. As in the paper, AdaLayerNorm is replaced by plain LayerNorm (footnote 7); the
timestep enters every ResBlock as an added Dense(silu(temb)); the blocks at the lowest resolution
have bidirectional self-attention over all positions of one image. Every (b, m) image is processed
on its own: LayerNorm is over channels and attention is within the image.

Defaults (ours; the paper gives only the 0.27B total for k=2): width 1024 with attention at the
lowest resolution, halved for each higher-resolution level, so per-level conv FLOPs stay equal:
k=1 (1024,), k=2 (512, 1024), k=4 (256, 512, 1024), k=8 (128, 256, 512, 1024);
DEFAULT_RES_BLOCKS = 3 ResBlocks per level in the encoder (4 in the decoder, which also consumes the
level's entry skip, as in ADM); timestep-embedding width channels[-1]; 64-channel attention heads.
Measured encoder + decoder parameters with latent c = 8:

  d_model  |  k=1     k=2     k=4     k=8
  768      |  0.219B  0.273B  0.287B  0.291B
  1024     |  0.220B  0.273B  0.287B  0.291B
  1536     |  0.221B  0.274B  0.288B  0.292B
  2048     |  0.222B  0.275B  0.289B  0.293B
  4096     |  0.226B  0.279B  0.294B  0.298B

Only the two d_model projections depend on d_model, so the count is nearly constant across
transformer sizes, as in the paper.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models.patching import TimestepEmbedding

DEFAULT_RES_BLOCKS = 3
LOWEST_WIDTH = 1024
ATTENTION_HEAD_DIM = 64
CONV_AXES = ("conv_height", "conv_width", "unet_in", "unet_out")


def default_channels(patch_size: int) -> tuple[int, ...]:
  """Width per level, highest resolution first: LOWEST_WIDTH at the bottom, halved per level above."""
  levels = _num_levels(patch_size)
  return tuple(LOWEST_WIDTH >> (levels - 1 - i) for i in range(levels))


def _num_levels(patch_size: int) -> int:
  levels = round(math.log2(patch_size)) + 1
  if patch_size < 1 or 2 ** (levels - 1) != patch_size:
    raise ValueError(f"patch_size must be a power of two, got {patch_size}")
  return levels


def _temb_width(channels):
  """Timestep-embedding width: the widest (lowest-resolution) U-Net width."""
  return channels[-1]


def _check(patch_size, channels, num_res_blocks):
  if len(channels) != _num_levels(patch_size):
    raise ValueError(f"patch_size {patch_size} needs {_num_levels(patch_size)} channel widths, got {channels}")
  if num_res_blocks < 1:
    raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")


def _conv(m, features, size, name, strides=1, kernel_init=None, axes=CONV_AXES):
  pad = size // 2
  kernel_init = nn.initializers.lecun_normal() if kernel_init is None else kernel_init
  return nn.Conv(features, (size, size), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                 dtype=m.dtype, param_dtype=m.param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _dense(m, features, name, axes=("unet_in", "unet_out")):
  return nn.Dense(features, dtype=m.dtype, param_dtype=m.param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def _norm(m, name, x):
  """LayerNorm over the channel axis, computed in float32, returned in m.dtype."""
  ln = nn.LayerNorm(dtype=jnp.float32, param_dtype=m.param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("unet_out",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("unet_out",)))
  return ln(x.astype(jnp.float32)).astype(m.dtype)


class ResBlock(nn.Module):
  """LN -> SiLU -> conv3x3, + Dense(silu(temb)), LN -> SiLU -> conv3x3; residual (1x1 conv if widths differ).

  x: [N, H, W, C_in]; temb: [N, T] -> [N, H, W, features].
  """
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    h = _conv(self, self.features, 3, "conv1")(nn.silu(_norm(self, "norm1", x)))
    h = h + _dense(self, self.features, "temb_proj")(nn.silu(temb))[:, None, None, :]
    h = _conv(self, self.features, 3, "conv2")(nn.silu(_norm(self, "norm2", h)))
    residual = x if x.shape[-1] == self.features else _conv(self, self.features, 1, "residual")(x)
    return residual + h


class SpatialAttention(nn.Module):
  """Pre-norm bidirectional multi-head self-attention over the H*W positions of each image, residual.

  x: [N, H, W, C] -> [N, H, W, C]; heads of ATTENTION_HEAD_DIM channels (one head if C is smaller).
  """
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hh, ww, c = x.shape
    heads = max(1, c // ATTENTION_HEAD_DIM)
    if c % heads:
      raise ValueError(f"attention width {c} does not split into {heads} heads")
    y = _norm(self, "norm", x).reshape(n, hh * ww, c)
    q, k, v = (_dense(self, c, name)(y).reshape(n, hh * ww, heads, c // heads) for name in ("query", "key", "value"))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c // heads)), axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, hh * ww, c)
    return x + _dense(self, c, "out")(out).reshape(n, hh, ww, c)


class UNetPatchEncoder(nn.Module):
  """U-Net down path, then LayerNorm -> Dense(d_model) at each position of the (h/k, w/k) grid.

  latents: [B, M, h, w, c]; t: [B, M] int -> (x [B, M, n, d_model] with n = (h/k) * (w/k) in raster
  order, skips: tuple of [B, M, h_i, w_i, C_i] down-path activations for UNetPatchDecoder).
  """
  d_model: int
  patch_size: int
  channels: tuple[int, ...]
  num_res_blocks: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, t):
    _check(self.patch_size, self.channels, self.num_res_blocks)
    b, m, hh, ww, c = latents.shape
    k, last = self.patch_size, len(self.channels) - 1
    if hh % k or ww % k:
      raise ValueError(f"latent size {(hh, ww)} is not a multiple of patch_size {k}")
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    temb = TimestepEmbedding(_temb_width(self.channels), name="timestep_embedding", **kw)(t.reshape(b * m))
    x = _conv(self, self.channels[0], 3, "conv_in")(latents.reshape(b * m, hh, ww, c).astype(self.dtype))
    skips = [x]
    for i, width in enumerate(self.channels):
      for j in range(self.num_res_blocks):
        x = ResBlock(width, name=f"down_{i}_res_{j}", **kw)(x, temb)
        if i == last:
          x = SpatialAttention(name=f"down_{i}_attn_{j}", **kw)(x)
        skips.append(x)
      if i < last:
        x = _conv(self, width, 3, f"down_{i}_downsample", strides=2)(x)
        skips.append(x)
    x = _dense(self, self.d_model, "proj_out", axes=("unet_in", "embed"))(_norm(self, "out_norm", x))
    x = x.reshape(b, m, (hh // k) * (ww // k), self.d_model)        # row-major grid = raster order
    return x, tuple(s.reshape(b, m, *s.shape[1:]) for s in skips)


class UNetPatchDecoder(nn.Module):
  """Dense(d_model -> channels[-1]) on the patch grid, U-Net up path with skips, zero-init conv to eps.

  h: [B, M, n, d_model]; t: [B, M] int; skips: from UNetPatchEncoder -> eps [B, M, h, w, latent_channels].
  """
  patch_size: int
  latent_channels: int
  channels: tuple[int, ...]
  num_res_blocks: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, t, skips):
    _check(self.patch_size, self.channels, self.num_res_blocks)
    b, m, n, d = h.shape
    last = len(self.channels) - 1
    expected = 1 + len(self.channels) * self.num_res_blocks + last
    if len(skips) != expected:
      raise ValueError(f"expected {expected} skips, got {len(skips)}")
    skips = [s.reshape(b * m, *s.shape[2:]) for s in skips]
    gh, gw = skips[-1].shape[1:3]
    if gh * gw != n:
      raise ValueError(f"{n} patches do not match the {gh}x{gw} grid of the lowest skip")
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    temb = TimestepEmbedding(_temb_width(self.channels), name="timestep_embedding", **kw)(t.reshape(b * m))
    x = _dense(self, self.channels[-1], "proj_in", axes=("embed", "unet_out"))(h.reshape(b * m, gh, gw, d))
    for i in reversed(range(len(self.channels))):
      for j in range(self.num_res_blocks + 1):
        x = ResBlock(self.channels[i], name=f"up_{i}_res_{j}", **kw)(jnp.concatenate([x, skips.pop()], -1), temb)
        if i == last:
          x = SpatialAttention(name=f"up_{i}_attn_{j}", **kw)(x)
      if i > 0:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)             # nearest-neighbour 2x
        x = _conv(self, self.channels[i], 3, f"up_{i}_upsample")(x)
    x = nn.silu(_norm(self, "out_norm", x))
    # Output axis "patch" (as LinearPatchDecoder): the few latent channels are never sharded.
    x = _conv(self, self.latent_channels, 3, "conv_out", kernel_init=nn.initializers.zeros,
              axes=CONV_AXES[:3] + ("patch",))(x)
    return x.reshape(b, m, *x.shape[1:])
