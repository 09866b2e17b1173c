"""U-Net patch encoder/decoder: shapes, zero-init output, per-image independence, timestep use,
raster order of the patch grid, logical axis names on every parameter, default parameter count."""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from tfusion.models import patching, unet
from tests.helpers import logically_partitioned_params

B, M, H, W, C, D = 2, 2, 16, 16, 4, 32


def tiny_channels(k):
  return tuple(8 * 2 ** i for i in range(int(math.log2(k)) + 1))


def modules(k, num_res_blocks=1, dtype=jnp.float32):
  channels = tiny_channels(k)
  return (unet.UNetPatchEncoder(D, k, channels, num_res_blocks, dtype=dtype),
          unet.UNetPatchDecoder(k, C, channels, num_res_blocks, dtype=dtype))


def inputs(seed=0):
  latents = jax.random.normal(jax.random.key(seed), (B, M, H, W, C))
  t = jnp.array([[10, 500], [999, 0]], jnp.int32)
  return latents, t


def random_params(variables, seed):
  """Fill a (possibly abstract) params tree with numpy draws: kernels ~ N(0, 1/fan_in), biases and
  LayerNorm offsets ~ N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2). Every layer is non-zero, and
  no random-number program has to be compiled (threefry/rbg init programs compile slowly on CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, v):
    if len(v.shape) >= 2:
      return jnp.asarray(rng.standard_normal(v.shape) / math.sqrt(math.prod(v.shape[:-1])), jnp.float32)
    return jnp.asarray((path[-1] == "scale") + 0.1 * rng.standard_normal(v.shape), jnp.float32)
  return edit(nn.unbox(variables), draw)


@functools.lru_cache
def init(k):
  """(jitted encoder apply, jitted decoder apply, encoder params, decoder params) for the tiny config,
  with random_params (the decoder's output layer is not zero)."""
  enc, dec = modules(k)
  latents, t = inputs()
  enc_apply, dec_apply = jax.jit(enc.apply), jax.jit(dec.apply)
  enc_params = random_params(jax.eval_shape(enc.init, jax.random.key(0), latents, t), 1)
  x, skips = enc_apply(enc_params, latents, t)
  dec_params = random_params(jax.eval_shape(dec.init, jax.random.key(0), x, t, skips), 2)
  return enc_apply, dec_apply, enc_params, dec_params


def edit(params, fn):
  """Apply fn(path, value) to every leaf of a params dict (path: tuple of names)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: fn(path, v) for path, v in flat.items()})


def randomise_output(params):
  """Replace the decoder's zero-initialised conv_out with random values."""
  rng = np.random.default_rng(3)
  return edit(params, lambda p, v: jnp.asarray(rng.standard_normal(v.shape), v.dtype) if p[-2] == "conv_out" else v)


def without_attention(params):
  """Zero the attention output projections: every SpatialAttention becomes the identity."""
  return edit(params, lambda p, v: jnp.zeros_like(v) if "_attn_" in p[-3] and p[-2] == "out" else v)


def per_patch_change(a, b, k):
  """max |a - b| over each k x k patch, in patchify order.  [B, M, h, w, c] -> [B, M, n]."""
  return np.abs(np.asarray(patching.patchify(a - b, k))).max(-1)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_shapes(k):
  enc, dec = modules(k)
  latents, t = inputs()
  enc_vars = jax.eval_shape(enc.init, jax.random.key(0), latents, t)
  x, skips = jax.eval_shape(enc.apply, enc_vars, latents, t)
  n = (H // k) * (W // k)
  assert x.shape == (B, M, n, D)
  levels = int(math.log2(k)) + 1
  assert len(skips) == 1 + levels * 1 + (levels - 1)
  assert skips[0].shape == (B, M, H, W, 8) and skips[-1].shape == (B, M, H // k, W // k, 8 * k)
  assert all(s.shape[:2] == (B, M) for s in skips)
  dec_vars = jax.eval_shape(dec.init, jax.random.key(0), x, t, skips)
  assert jax.eval_shape(dec.apply, dec_vars, x, t, skips).shape == (B, M, H, W, C)


def test_decoder_zero_init_then_nonzero():
  enc_apply, dec_apply, enc_params, _ = init(2)
  _, dec = modules(2)
  latents, t = inputs()
  x, skips = enc_apply(enc_params, latents, t)
  dec_params = nn.unbox(jax.jit(dec.init)(jax.random.key(2, impl="rbg"), x, t, skips))   # the real init
  assert np.all(np.asarray(dec_apply(dec_params, x, t, skips)) == 0.0)
  eps = np.asarray(dec_apply(randomise_output(dec_params), x, t, skips))
  assert np.all(np.isfinite(eps))
  assert np.abs(eps).min() > 0 and eps.std() > 0.1


def test_images_independent_and_bidirectional():
  k = 2
  enc_apply, dec_apply, enc_params, dec_params = init(k)
  latents, t = inputs()
  x, skips = enc_apply(enc_params, latents, t)
  eps = dec_apply(dec_params, x, t, skips)

  # One latent pixel of image (0, 1): the encoder output and the full pipeline change for that
  # image only, and at every one of its patches (attention is bidirectional within the image).
  x2, skips2 = enc_apply(enc_params, latents.at[0, 1, 3, 12, 2].add(1.0), t)
  eps2 = dec_apply(dec_params, x2, t, skips2)
  dx = np.abs(np.asarray(x2 - x)).max(-1)                        # [B, M, n]
  de = per_patch_change(eps2, eps, k)
  for d in (dx, de):
    assert np.all(d[0, 1] > 0), d[0, 1]
    d[0, 1] = 0
    assert np.all(d == 0)

  # One patch vector of image (0, 1) into the decoder (same skips): every patch of that image only.
  eps3 = dec_apply(dec_params, x.at[0, 1, 5].add(1.0), t, skips)
  de = per_patch_change(eps3, eps, k)
  assert np.all(de[0, 1] > 0), de[0, 1]
  de[0, 1] = 0
  assert np.all(de == 0)


def test_timestep_changes_output():
  enc_apply, dec_apply, enc_params, dec_params = init(2)
  latents, t = inputs()
  x, skips = enc_apply(enc_params, latents, t)
  t2 = t.at[1, 0].set(20)
  x2, skips2 = enc_apply(enc_params, latents, t2)
  dx = np.abs(np.asarray(x2 - x)).max((-2, -1))
  assert dx[1, 0] > 1e-3 and dx[0, 0] == dx[0, 1] == dx[1, 1] == 0
  # The decoder alone (same h and skips), and the full pipeline.
  for eps2 in (dec_apply(dec_params, x, t2, skips), dec_apply(dec_params, x2, t2, skips2)):
    de = np.abs(np.asarray(eps2 - dec_apply(dec_params, x, t, skips))).max((-3, -2, -1))
    assert de[1, 0] > 1e-3 and de[0, 0] == de[0, 1] == de[1, 1] == 0


def centroid(change):
  """Change-weighted mean (row, col) of a [g, g] map."""
  rows, cols = np.mgrid[:change.shape[0], :change.shape[1]]
  return np.array([(change * rows).sum(), (change * cols).sum()]) / change.sum()


@pytest.mark.parametrize("k", [1, 2])
def test_patch_vectors_follow_patchify_raster_order(k):
  """With attention switched off the U-Net is local. A change to one latent pixel, which patchify
  puts in window j, moves encoder vectors only near j (and j itself); a change to decoder input j
  moves the eps windows around patchify window j. Transposed (column-major) order would fail."""
  enc_apply, dec_apply, enc_params, dec_params = init(k)
  enc_params, dec_params = without_attention(enc_params), without_attention(dec_params)
  latents, t = inputs()
  x, skips = enc_apply(enc_params, latents, t)
  eps = dec_apply(dec_params, x, t, skips)
  g = W // k
  for row, col in [(2, 13), (13, 3)]:                            # latent pixel, off the diagonal
    window = np.zeros((H, W, 1), np.float32)
    window[row, col] = 1
    j = int(np.argmax(np.asarray(patching.patchify(window, k)).sum(-1)))
    source = np.array(divmod(j, g))
    assert tuple(source) == (row // k, col // k)

    x2, _ = enc_apply(enc_params, latents.at[1, 1, row, col].add(1.0), t)
    dx = np.abs(np.asarray(x2 - x)).max(-1)[1, 1].reshape(g, g)
    near = np.abs(np.mgrid[:g, :g] - source[:, None, None]).max(0) <= 4   # the receptive field
    assert dx.flat[j] > 0 and np.all(dx[~near] == 0), dx
    assert np.abs(centroid(dx) - source).max() < 1.5, dx

    de = per_patch_change(dec_apply(dec_params, x.at[1, 1, j].add(1.0), t, skips), eps, k)[1, 1].reshape(g, g)
    assert de.flat[j] > 0 and np.abs(centroid(de) - source).max() < 1.5, de


def test_every_param_has_logical_names():
  k = 4
  enc, dec = modules(k, dtype=jnp.bfloat16)
  latents, t = inputs()
  enc_vars = jax.eval_shape(enc.init, jax.random.key(0), latents, t)
  (x, skips) = jax.eval_shape(enc.apply, enc_vars, latents, t)
  assert x.dtype == jnp.bfloat16
  dec_vars = jax.eval_shape(dec.init, jax.random.key(0), x, t, skips)
  assert jax.eval_shape(dec.apply, dec_vars, x, t, skips).dtype == jnp.bfloat16
  names = {}
  for variables in (enc_vars, dec_vars):
    assert all(v.value.dtype == jnp.float32 for v in logically_partitioned_params(variables))  # param_dtype
    flat = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"], sep="/")
    names.update(flat)
  assert names["conv_in/kernel"] == PartitionSpec(*unet.CONV_AXES)
  assert names["proj_out/kernel"] == PartitionSpec("unet_in", "embed")
  assert names["proj_out/bias"] == PartitionSpec("embed")
  assert names["proj_in/kernel"] == PartitionSpec("embed", "unet_out")
  assert names["up_2_attn_0/query/kernel"] == PartitionSpec("unet_in", "unet_out")
  assert names["down_0_res_0/norm1/scale"] == PartitionSpec("unet_out")
  assert names["conv_out/kernel"] == PartitionSpec("conv_height", "conv_width", "unet_in", "patch")
  assert names["conv_out/bias"] == PartitionSpec("patch")


def test_default_channels():
  for k in (1, 2, 4, 8):
    channels = unet.default_channels(k)
    assert len(channels) == int(math.log2(k)) + 1 and channels[-1] == unet.LOWEST_WIDTH
    assert all(a * 2 == b for a, b in itertools.pairwise(channels))
  with pytest.raises(ValueError):
    unet.default_channels(3)


def test_default_param_count_near_paper():
  """Paper §4.1: the U-Net encoder + decoder add 0.27B parameters (7B config: 32x32x8 latents, k=2)."""
  k, c, d_model = 2, 8, 4096
  channels = unet.default_channels(k)
  enc = unet.UNetPatchEncoder(d_model, k, channels, unet.DEFAULT_RES_BLOCKS)
  dec = unet.UNetPatchDecoder(k, c, channels, unet.DEFAULT_RES_BLOCKS)
  latents, t = jax.ShapeDtypeStruct((1, 1, 32, 32, c), jnp.float32), jax.ShapeDtypeStruct((1, 1), jnp.int32)
  enc_vars = jax.eval_shape(enc.init, jax.random.key(0), latents, t)
  x, skips = jax.eval_shape(enc.apply, enc_vars, latents, t)
  assert x.shape == (1, 1, 256, d_model)
  dec_vars = jax.eval_shape(dec.init, jax.random.key(0), x, t, skips)
  total = sum(math.prod(v.shape) for v in jax.tree.leaves(nn.unbox((enc_vars, dec_vars))))
  assert 0.22e9 <= total <= 0.32e9, total


def test_bad_channels_rejected():
  enc = unet.UNetPatchEncoder(D, 4, (8, 16), 1)
  latents, t = inputs()
  with pytest.raises(ValueError, match="channel widths"):
    enc.init(jax.random.key(0), latents, t)
