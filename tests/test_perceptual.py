"""LPIPS and the patch-GAN discriminator: metric properties, torch-named weight files against a float64 NumPy
reference, strict loading, discriminator shapes, hinge losses, a short discriminator fit, logical axis names."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import traverse_util

from tfusion.models import discriminator, lpips
from tests.helpers import assert_safetensors_round_trip, logically_partitioned_params

# Written out here, not taken from the module: torchvision vgg16 conv indices by stage, (in, out) channels.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
         17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
LIN_WIDTHS = (64, 128, 256, 512, 512)

lpips_apply = jax.jit(lpips.LPIPS().apply)


def images(seed, shape=(2, 32, 32, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def torch_tensors():
  """Random weights in torch names and layouts: He-normal kernels, non-zero biases, non-negative lin weights."""
  rng = np.random.default_rng(0)
  tensors = {}
  for i, (c_in, c_out) in CONVS.items():
    tensors[f"features.{i}.weight"] = rng.normal(0, math.sqrt(2 / (9 * c_in)), (c_out, c_in, 3, 3))
    tensors[f"features.{i}.bias"] = rng.normal(0, 0.1, (c_out,))
  for k, c in enumerate(LIN_WIDTHS):
    tensors[f"lin{k}.model.1.weight"] = rng.uniform(0, 2 / c, (1, c, 1, 1))
  return {name: value.astype(np.float32) for name, value in tensors.items()}


@pytest.fixture(scope="module")
def weight_file(torch_tensors, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors")
  safetensors.numpy.save_file(torch_tensors, path)
  return path


def reference_lpips(tensors, x, y):
  """LPIPS in float64 NumPy, NCHW, straight from the torch-layout arrays.  x, y: [B, H, W, 3] -> [B]."""
  t = {name: value.astype(np.float64) for name, value in tensors.items()}
  shift = np.array([-.030, -.088, -.188])[:, None, None]
  scale = np.array([.458, .448, .450])[:, None, None]

  def conv3x3(h, w, b):
    hh, ww = h.shape[2:]
    padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum("oi,bihw->bohw", w[:, :, dy, dx], padded[:, :, dy:dy + hh, dx:dx + ww], optimize=True)
              for dy in range(3) for dx in range(3))
    return out + b[:, None, None]

  def max_pool(h):
    b, c, hh, ww = h.shape
    return h.reshape(b, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))

  def taps(img):
    h = (img.astype(np.float64).transpose(0, 3, 1, 2) - shift) / scale
    out = []
    for stage in STAGES:
      if out:
        h = max_pool(h)
      for i in stage:
        h = np.maximum(conv3x3(h, t[f"features.{i}.weight"], t[f"features.{i}.bias"]), 0)
      out.append(h)
    return out

  def unit(f):
    return f / (np.sqrt(np.sum(f ** 2, axis=1, keepdims=True)) + 1e-10)

  dist = 0
  for k, (a, b) in enumerate(zip(taps(x), taps(y))):
    d = np.einsum("c,bchw->bhw", t[f"lin{k}.model.1.weight"][0, :, 0, 0], (unit(a) - unit(b)) ** 2)
    dist = dist + d.mean(axis=(1, 2))
  return dist


def test_lpips_metric_properties():
  """On the random fallback params (the one jax.random init in this file: its programs compile slowly on CPU)."""
  params = lpips.random_lpips_params(jax.random.key(0))
  assert all(np.all(params[f"lin{k}"]["kernel"] >= 0) for k in range(5))
  assert all(np.any(params["vgg"][f"features_{i}"]["kernel"] != 0) for i in CONVS)
  x, y = images(1), images(2)
  d_xy, d_yx, d_xx = (np.asarray(lpips_apply({"params": params}, a, b)) for a, b in ((x, y), (y, x), (x, x)))
  assert d_xy.shape == (2,) and d_xy.dtype == np.float32
  np.testing.assert_array_equal(d_xx, 0.0)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)     # the two halves' normalisations may round differently
  assert np.all(d_xy > 0)


def test_lpips_gradient_finite_where_features_vanish(weight_file):
  """relu5_3 is all zero (large negative bias): the unit normalisation must not turn d|f|/df into NaN."""
  params = lpips.load_lpips_params(weight_file)
  params["vgg"]["features_28"]["bias"] = np.full((512,), -1e3, np.float32)
  x, y = images(3, (1, 16, 16, 3)), images(4, (1, 16, 16, 3))
  grad = jax.jit(jax.grad(lambda a: lpips.LPIPS().apply({"params": params}, a, y).sum()))(x)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_load_matches_numpy_reference(torch_tensors, weight_file):
  params = lpips.load_lpips_params(weight_file)
  x, y = images(5), images(6)
  got = np.asarray(lpips_apply({"params": params}, x, y))
  want = reference_lpips(torch_tensors, x, y)
  # float32 (CPU convs are full float32) vs float64: each of the 13 convs sums <= 4608 products, whose rounding
  # errors (~6e-8 relative each) mostly cancel; the unit features of independent images differ by O(1), so no
  # cancellation amplifies them. Measured ~2e-7; 1e-5 leaves a wide margin, while any layout error (a transposed
  # kernel, swapped channels) moves the result by O(1).
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(want > 0)


def test_save_load_round_trip_bit_identical(torch_tensors, weight_file, tmp_path):
  params = lpips.load_lpips_params(weight_file)
  assert_safetensors_round_trip(lpips.save_lpips_params, lpips.load_lpips_params,
                               str(tmp_path / "again.safetensors"), params, torch_tensors)


def test_load_is_strict(torch_tensors, tmp_path):
  def load(tensors):
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return lpips.load_lpips_params(path)

  with pytest.raises(ValueError, match=r"missing keys \['lin3.model.1.weight'\]"):
    load({k: v for k, v in torch_tensors.items() if k != "lin3.model.1.weight"})
  with pytest.raises(ValueError, match=r"unexpected keys \['features.30.weight'\]"):
    load({**torch_tensors, "features.30.weight": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match=re.escape("features.5.weight (128, 64, 4, 4)")):
    load({**torch_tensors, "features.5.weight": np.zeros((128, 64, 4, 4), np.float32)})
  missing = str(tmp_path / "nowhere.safetensors")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    lpips.load_lpips_params(missing)


def test_lpips_params_match_torch_names_and_counts():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), x, x)
  flat = traverse_util.flatten_dict(nn.unbox(variables["params"]))
  want = {("vgg", f"features_{i}", p): None for i in CONVS for p in ("kernel", "bias")}
  want.update({(f"lin{k}", "kernel"): None for k in range(5)})
  assert set(flat) == set(want)
  assert sum(v.size for k, v in flat.items() if k[0] == "vgg") == 14_714_688
  assert sum(v.size for k, v in flat.items() if k[0] != "vgg") == 1_472
  assert flat[("vgg", "features_5", "kernel")].shape == (3, 3, 64, 128)
  assert flat[("lin2", "kernel")].shape == (1, 1, 256, 1)


@pytest.mark.parametrize("size,num_layers,out", [(32, 2, 6), (32, 3, 2), (64, 2, 14), (64, 3, 6)])
def test_discriminator_output_shape(size, num_layers, out):
  d = discriminator.PatchDiscriminator(channels=8, num_layers=num_layers)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(d.init, jax.random.key(0), x)
  logits = jax.eval_shape(d.apply, variables, x)
  assert logits.shape == (2, out, out, 1) and logits.dtype == jnp.float32


def test_hinge_losses_hand_computed():
  real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])   # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
  fake = jnp.array([[-3.0, 0.0], [1.0, -0.5]])  # relu(1 + fake) = 0, 1, 2, 0.5 -> mean 0.875
  np.testing.assert_allclose(discriminator.hinge_discriminator_loss(real, fake), 0.5 * (0.625 + 0.875))
  np.testing.assert_allclose(discriminator.generator_adversarial_loss(fake), -(-3.0 + 0.0 + 1.0 - 0.5) / 4)


def init_like_module(name, shape, rng):
  """The discriminator's init drawn with NumPy (no random-number program to compile): kernels N(0, 0.02^2),
  GroupNorm scales 1, biases 0."""
  if name == "kernel":
    return rng.normal(0, 0.02, shape).astype(np.float32)
  return np.full(shape, 1.0 if name == "scale" else 0.0, np.float32)


def test_discriminator_learns_real_from_fake():
  d = discriminator.PatchDiscriminator(channels=8, num_layers=2)
  rng = np.random.default_rng(0)
  grid = np.linspace(-1, 1, 32, dtype=np.float32)
  real = np.stack([np.broadcast_to(np.sin(3 * s * grid)[:, None, None] * grid[None, :, None], (32, 32, 3))
                   for s in (1, 2)]).astype(np.float32)                          # smooth
  fake = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)                  # noise
  abstract = nn.unbox(jax.eval_shape(d.init, jax.random.key(0), real))["params"]
  params = jax.tree_util.tree_map_with_path(lambda path, v: init_like_module(path[-1].key, v.shape, rng), abstract)
  tx = optax.adam(1e-3)

  def loss_fn(p):
    return discriminator.hinge_discriminator_loss(d.apply({"params": p}, real), d.apply({"params": p}, fake))

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize("module,x", [
    (lpips.LPIPS(), (jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),) * 2),
    (discriminator.PatchDiscriminator(channels=8), (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),)),
])
def test_logical_partition_specs(module, x):
  variables = jax.eval_shape(module.init, jax.random.key(0), *x)
  for v in logically_partitioned_params(variables):
    assert v.names == (lpips.CONV_AXES if v.value.ndim == 4 else ("vae_out",))
  assert discriminator.CONV_AXES == lpips.CONV_AXES
