"""The MoCo v2 / ResNet-50 identity loss: metric properties, a torchvision-named weight file against a float64
NumPy reference, the MoCo checkpoint prefix, save / load round trip, strict loading, param names and counts.
No model.init: random weights are NumPy draws in torch layout (ResNet-50's init program compiles slowly on CPU)."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from tfusion.models import moco
from tests.helpers import assert_safetensors_round_trip, logically_partitioned_params

# Written out here, not taken from the module: torchvision resnet50's blocks per layer and widths.
BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)

loss_apply = jax.jit(moco.IdentityLoss().apply)
features_apply = jax.jit(moco.ResNet50Features().apply)


def images(seed, shape=(2, 32, 32, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def torch_tensors():
  """A random torchvision resnet50 state_dict (fc and num_batches_tracked included): He-normal conv kernels,
  BatchNorm with positive weights and running variances; bn3 weights small, as in trained ResNets, so the
  residual stream does not blow up over 16 blocks."""
  rng = np.random.default_rng(0)
  tensors = {}

  def conv_bn(conv, bn, c_in, c_out, size, gain=(0.5, 1.5)):
    tensors[f"{conv}.weight"] = rng.normal(0, math.sqrt(2 / (c_in * size * size)), (c_out, c_in, size, size))
    tensors[f"{bn}.weight"] = rng.uniform(*gain, c_out)
    tensors[f"{bn}.bias"] = rng.normal(0, 0.1, c_out)
    tensors[f"{bn}.running_mean"] = rng.normal(0, 0.2, c_out)
    tensors[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, c_out)
    tensors[f"{bn}.num_batches_tracked"] = np.array(1000, np.int64)

  conv_bn("conv1", "bn1", 3, 64, 7)
  c_in = 64
  for i, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), 1):
    for j in range(blocks):
      p = f"layer{i}.{j}"
      conv_bn(f"{p}.conv1", f"{p}.bn1", c_in, width, 1)
      conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
      conv_bn(f"{p}.conv3", f"{p}.bn3", width, 4 * width, 1, gain=(0.1, 0.3))
      if j == 0:
        conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", c_in, 4 * width, 1)
      c_in = 4 * width
  tensors["fc.weight"] = rng.normal(0, 0.01, (1000, 2048))
  tensors["fc.bias"] = np.zeros(1000)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in tensors.items()}


def used(tensors):
  """The tensors the loader keeps: no fc, no num_batches_tracked."""
  return {k: v for k, v in tensors.items() if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}


@pytest.fixture(scope="module")
def weight_file(torch_tensors, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("moco") / "resnet50.safetensors")
  safetensors.numpy.save_file(torch_tensors, path)
  return path


@pytest.fixture(scope="module")
def params(weight_file):
  return moco.load_moco_params(weight_file)


def reference_features(tensors, x):
  """torchvision resnet50 layer1..layer4 in float64 NumPy, NCHW, straight from the torch-layout arrays.
  x: [B, H, W, 3] -> 4 arrays [B, H', W', C] (NHWC, to compare)."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}

  def conv(h, name, stride=1):
    w = t[f"{name}.weight"]
    size, pad = w.shape[2], w.shape[2] // 2
    out_h, out_w = ((n + 2 * pad - size) // stride + 1 for n in h.shape[2:])
    padded = np.pad(h, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return sum(np.einsum("oi,bihw->bohw", w[:, :, dy, dx],
                         padded[:, :, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride], optimize=True)
               for dy in range(size) for dx in range(size))

  def bn(h, name):
    weight, bias, mean, var = (t[f"{name}.{s}"][:, None, None] for s in ("weight", "bias", "running_mean",
                                                                          "running_var"))
    return (h - mean) / np.sqrt(var + 1e-5) * weight + bias

  def relu(h):
    return np.maximum(h, 0)

  def max_pool(h):                                   # 3x3, stride 2, padding 1
    out_h, out_w = ((n - 1) // 2 + 1 for n in h.shape[2:])
    padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.max([padded[:, :, dy:dy + 2 * out_h:2, dx:dx + 2 * out_w:2] for dy in range(3) for dx in range(3)],
                  axis=0)

  h = max_pool(relu(bn(conv(x.astype(np.float64).transpose(0, 3, 1, 2), "conv1", 2), "bn1")))
  out = []
  for i, blocks in enumerate(BLOCKS, 1):
    for j in range(blocks):
      p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
      r = relu(bn(conv(h, f"{p}.conv1"), f"{p}.bn1"))
      r = relu(bn(conv(r, f"{p}.conv2", stride), f"{p}.bn2"))
      r = bn(conv(r, f"{p}.conv3"), f"{p}.bn3")
      shortcut = bn(conv(h, f"{p}.downsample.0", stride), f"{p}.downsample.1") if j == 0 else h
      h = relu(r + shortcut)
    out.append(h.transpose(0, 2, 3, 1))
  return out


def reference_loss(tensors, x, y):
  """L_ID in float64 NumPy: ImageNet-normalised [0, 1] images, unit features over channels, mean squared
  difference over positions and channels, summed over layer1..layer4.  x, y: [B, H, W, 3] -> [B]."""
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

  def unit(f):
    return f / (np.sqrt(np.sum(f ** 2, axis=-1, keepdims=True)) + 1e-10)

  a, b = (reference_features(tensors, ((img.astype(np.float64) + 1) / 2 - mean) / std) for img in (x, y))
  return sum(np.mean((unit(fa) - unit(fb)) ** 2, axis=(1, 2, 3)) for fa, fb in zip(a, b))


def test_features_match_numpy_reference(torch_tensors, params):
  x = images(1, (1, 32, 32, 3))
  got = features_apply({"params": params["resnet"]}, x)
  want = reference_features(torch_tensors, x)
  assert [f.shape for f in got] == [(1, 8, 8, 256), (1, 4, 4, 512), (1, 2, 2, 1024), (1, 1, 1, 2048)]
  for g, w in zip(got, want):
    # float32 (CPU convs are full float32) vs float64 over up to 53 convs of <= 4608 products: rounding errors
    # (~6e-8 relative each) mostly cancel and BN / residual sums keep the scale O(1); measured <= 7e-7 of the
    # layer's largest value. 2e-5 of it leaves a 30x margin; a layout error (transposed kernel, stride on the
    # wrong conv, swapped BN statistics) moves the features by O(1) of it.
    scale = np.abs(w).max()
    assert 0.1 < scale < 100 and 0.05 < np.mean(w > 0) < 0.95          # non-degenerate features
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale)


def test_identity_loss_zero_on_itself_positive_otherwise_and_matches_reference(torch_tensors, params):
  x, y = images(2), images(3)
  d_xx, d_xy = (np.asarray(loss_apply({"params": params}, x, b)) for b in (x, y))
  assert d_xy.shape == (2,) and d_xy.dtype == np.float32
  np.testing.assert_array_equal(d_xx, 0.0)
  assert np.all(d_xy > 0)
  # The unit features of independent images differ by O(1), so the float32 feature errors (<= 7e-7 relative,
  # above) reach the loss unamplified; measured ~1e-7. A wrong normalisation or reduction is off by O(1).
  np.testing.assert_allclose(d_xy, reference_loss(torch_tensors, x, y), rtol=1e-5)


def test_moco_prefixed_file_loads_the_same_params(torch_tensors, params, tmp_path):
  prefixed = {f"module.encoder_q.{k}": v for k, v in torch_tensors.items() if not k.startswith("fc.")}
  rng = np.random.default_rng(1)                     # MoCo v2's MLP head: fc.0 (2048 -> 2048), fc.2 (2048 -> 128)
  prefixed.update({"module.encoder_q.fc.0.weight": rng.normal(0, 0.01, (2048, 2048)).astype(np.float32),
                   "module.encoder_q.fc.0.bias": np.zeros(2048, np.float32),
                   "module.encoder_q.fc.2.weight": rng.normal(0, 0.01, (128, 2048)).astype(np.float32),
                   "module.encoder_q.fc.2.bias": np.zeros(128, np.float32)})
  path = str(tmp_path / "moco_v2.safetensors")
  safetensors.numpy.save_file(prefixed, path)
  loaded = traverse_util.flatten_dict(moco.load_moco_params(path))
  want = traverse_util.flatten_dict(params)
  assert set(loaded) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_save_load_round_trip_bit_identical(torch_tensors, params, tmp_path):
  assert_safetensors_round_trip(moco.save_moco_params, moco.load_moco_params, str(tmp_path / "again.safetensors"),
                               params, used(torch_tensors))


def test_load_is_strict(torch_tensors, tmp_path):
  def load(tensors):
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return moco.load_moco_params(path)

  tensors = used(torch_tensors)
  with pytest.raises(ValueError, match=re.escape("missing keys ['layer3.2.bn2.running_var']")):
    load({k: v for k, v in tensors.items() if k != "layer3.2.bn2.running_var"})
  with pytest.raises(ValueError, match=re.escape("unexpected keys ['layer4.3.conv1.weight']")):
    load({**tensors, "layer4.3.conv1.weight": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match=re.escape("layer2.0.conv2.weight (128, 128, 1, 1)")):
    load({**tensors, "layer2.0.conv2.weight": np.zeros((128, 128, 1, 1), np.float32)})
  missing = str(tmp_path / "nowhere.safetensors")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    moco.load_moco_params(missing)


def test_params_match_torch_names_counts_and_axes(torch_tensors):
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(moco.IdentityLoss().init, jax.random.key(0), x, x)
  for v in logically_partitioned_params(variables):
    assert v.names == (("conv_height", "conv_width", "vae_in", "vae_out") if v.value.ndim == 4 else ("vae_out",))
  flat = traverse_util.flatten_dict(nn.unbox(variables["params"]))
  assert len(flat) == len(used(torch_tensors)) == 265
  stats = sum(v.size for k, v in flat.items() if k[-1] in ("mean", "var"))
  assert sum(v.size for v in flat.values()) - stats == 23_508_032 and stats == 53_120
  assert flat[("resnet", "conv1", "kernel")].shape == (7, 7, 3, 64)
  assert flat[("resnet", "layer2_0", "conv2", "kernel")].shape == (3, 3, 128, 128)
  assert flat[("resnet", "layer3_0", "downsample_0", "kernel")].shape == (1, 1, 512, 1024)
  assert flat[("resnet", "layer4_2", "bn3", "var")].shape == (2048,)
