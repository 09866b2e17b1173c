"""The FID Inception-v3: param names, counts and axes, save / load round trip in torch names, strict loading, and
blocks and features against a float64 NumPy reference written from pytorch-fid's / torchvision's torch source.
No model.init: random weights are NumPy draws with a fixed seed (the init program, mostly its random number
generation, takes ~30 s to compile on CPU; the forward pass ~4 s)."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from tests.helpers import logically_partitioned_params, random_inception_params
from tfusion.evaluation import inception

BN_STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def abstract_variables():
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(inception.FidInception().init, jax.random.key(0), x)


@pytest.fixture(scope="module")
def params(abstract_variables):
  return random_inception_params(abstract_variables["params"])


@pytest.fixture(scope="module")
def weight_file(params, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "fid_inception.safetensors")
  inception.save_inception_params(path, params)
  return path


@pytest.fixture(scope="module")
def torch_tensors(weight_file):
  return safetensors.numpy.load_file(weight_file)


@pytest.fixture(scope="module")
def loaded(weight_file):
  return inception.load_inception_params(weight_file)


# ---------------------------------------------------------------------------------------------------------------
# float64 NumPy reference, NHWC, straight from the torch-named OIHW tensors; paddings and strides as torch's source.

def ref_conv(t, h, name, stride=1, pad=(0, 0)):
  """BasicConv2d: conv (no bias), BatchNorm eps 1e-3 with running statistics, ReLU."""
  w = t[f"{name}.conv.weight"].astype(np.float64)
  kh, kw = w.shape[2:]
  padded = np.pad(h, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  oh, ow = (padded.shape[1] - kh) // stride + 1, (padded.shape[2] - kw) // stride + 1
  y = sum(np.tensordot(padded[:, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride], w[:, :, dy, dx],
                       ([3], [1])) for dy in range(kh) for dx in range(kw))
  weight, bias, mean, var = (t[f"{name}.bn.{s}"].astype(np.float64) for s in ("weight", "bias") + BN_STATS)
  return np.maximum((y - mean) / np.sqrt(var + 1e-3) * weight + bias, 0)


def ref_pool(h, kind, stride=1, pad=1, count_include_pad=False):
  """3x3 max or average pool; torch pads max-pools with -inf."""
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  padded = np.pad(h, padding, constant_values=-np.inf if kind == "max" else 0)
  oh, ow = (padded.shape[1] - 3) // stride + 1, (padded.shape[2] - 3) // stride + 1

  def windows(a):
    return [a[:, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride] for dy in range(3) for dx in range(3)]

  if kind == "max":
    return np.max(windows(padded), axis=0)
  count = 9 if count_include_pad else np.sum(windows(np.pad(np.ones_like(h), padding)), axis=0)
  return np.sum(windows(padded), axis=0) / count


def ref_a(t, h, p, count_include_pad=False):
  b1 = ref_conv(t, h, f"{p}.branch1x1")
  b5 = ref_conv(t, ref_conv(t, h, f"{p}.branch5x5_1"), f"{p}.branch5x5_2", pad=(2, 2))
  b3 = ref_conv(t, ref_conv(t, h, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", pad=(1, 1))
  b3 = ref_conv(t, b3, f"{p}.branch3x3dbl_3", pad=(1, 1))
  bp = ref_conv(t, ref_pool(h, "avg", count_include_pad=count_include_pad), f"{p}.branch_pool")
  return np.concatenate([b1, b5, b3, bp], axis=-1)


def ref_b(t, h, p):
  b3 = ref_conv(t, h, f"{p}.branch3x3", stride=2)
  bd = ref_conv(t, ref_conv(t, h, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", pad=(1, 1))
  bd = ref_conv(t, bd, f"{p}.branch3x3dbl_3", stride=2)
  return np.concatenate([b3, bd, ref_pool(h, "max", stride=2, pad=0)], axis=-1)


def ref_c(t, h, p):
  b1 = ref_conv(t, h, f"{p}.branch1x1")
  b7 = ref_conv(t, h, f"{p}.branch7x7_1")
  b7 = ref_conv(t, ref_conv(t, b7, f"{p}.branch7x7_2", pad=(0, 3)), f"{p}.branch7x7_3", pad=(3, 0))
  bd = ref_conv(t, h, f"{p}.branch7x7dbl_1")
  for i, pad in zip(range(2, 6), ((3, 0), (0, 3), (3, 0), (0, 3))):
    bd = ref_conv(t, bd, f"{p}.branch7x7dbl_{i}", pad=pad)
  bp = ref_conv(t, ref_pool(h, "avg"), f"{p}.branch_pool")
  return np.concatenate([b1, b7, bd, bp], axis=-1)


def ref_d(t, h, p):
  b3 = ref_conv(t, ref_conv(t, h, f"{p}.branch3x3_1"), f"{p}.branch3x3_2", stride=2)
  b7 = ref_conv(t, h, f"{p}.branch7x7x3_1")
  b7 = ref_conv(t, ref_conv(t, b7, f"{p}.branch7x7x3_2", pad=(0, 3)), f"{p}.branch7x7x3_3", pad=(3, 0))
  b7 = ref_conv(t, b7, f"{p}.branch7x7x3_4", stride=2)
  return np.concatenate([b3, b7, ref_pool(h, "max", stride=2, pad=0)], axis=-1)


def ref_e(t, h, p, pool):
  def split(x, name):
    return [ref_conv(t, x, f"{name}a", pad=(0, 1)), ref_conv(t, x, f"{name}b", pad=(1, 0))]

  b1 = ref_conv(t, h, f"{p}.branch1x1")
  b3 = split(ref_conv(t, h, f"{p}.branch3x3_1"), f"{p}.branch3x3_2")
  bd = ref_conv(t, ref_conv(t, h, f"{p}.branch3x3dbl_1"), f"{p}.branch3x3dbl_2", pad=(1, 1))
  bp = ref_conv(t, ref_pool(h, pool), f"{p}.branch_pool")
  return np.concatenate([b1, *b3, *split(bd, f"{p}.branch3x3dbl_3"), bp], axis=-1)


def ref_resize(x, size):
  """torch's F.interpolate(mode="bilinear", align_corners=False): source index (i + 0.5) * in / out - 0.5,
  clamped below at 0; the upper neighbour clamped to the last pixel; no antialiasing."""
  for axis in (1, 2):
    n = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1, lam = np.minimum(i0 + 1, n - 1), src - i0
    shape = [1, 1, 1, 1]
    shape[axis] = size
    x = np.take(x, i0, axis) * (1 - lam).reshape(shape) + np.take(x, i1, axis) * lam.reshape(shape)
  return x


def ref_features(t, images_uint8):
  """pytorch-fid's InceptionV3 (FID weights, block 3): /255, resize to 299, 2x - 1, network, global mean."""
  h = 2 * ref_resize(images_uint8.astype(np.float64) / 255, 299) - 1
  h = ref_conv(t, ref_conv(t, h, "Conv2d_1a_3x3", stride=2), "Conv2d_2a_3x3")
  h = ref_pool(ref_conv(t, h, "Conv2d_2b_3x3", pad=(1, 1)), "max", stride=2, pad=0)
  h = ref_pool(ref_conv(t, ref_conv(t, h, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"), "max", stride=2, pad=0)
  for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    h = ref_a(t, h, name)
  h = ref_b(t, h, "Mixed_6a")
  for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    h = ref_c(t, h, name)
  h = ref_e(t, ref_e(t, ref_d(t, h, "Mixed_7a"), "Mixed_7b", "avg"), "Mixed_7c", "max")
  assert h.shape[1:] == (8, 8, 2048)
  return h.mean(axis=(1, 2))


def max_relative_error(got, want):
  """Largest error relative to the largest reference value."""
  return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


# Float32 (full-precision convs) against float64: measured errors are ~6e-7 of the largest value, for a block and
# for the full network alike; a layout error (transposed kernel, wrong padding, wrong pool) is O(1).
RTOL = 1e-4

a_apply = jax.jit(inception.FidInceptionA(32).apply)
e2_apply = jax.jit(inception.FidInceptionE("max").apply)


def test_param_count_names_and_axes(abstract_variables):
  # torchvision's inception_v3 has 27,161,264 params (Inception_V3_Weights.IMAGENET1K_V1.meta["num_params"]:
  # aux_logits=True, 1000 classes). Without fc (2048 -> 1000) and AuxLogits (conv0 768 -> 128 1x1 + BN, conv1
  # 128 -> 768 5x5 + BN, fc 768 -> 1000):
  aux_logits = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
  expected = 27_161_264 - (2048 * 1000 + 1000) - aux_logits
  assert expected == 21_785_568
  for v in logically_partitioned_params(abstract_variables):
    assert v.names == (("conv_height", "conv_width", "vae_in", "vae_out") if v.value.ndim == 4 else ("vae_out",))
  flat = traverse_util.flatten_dict(nn.unbox(abstract_variables["params"]))
  stats = sum(math.prod(v.shape) for k, v in flat.items() if k[-1] in ("mean", "var"))
  assert sum(math.prod(v.shape) for v in flat.values()) - stats == expected
  assert stats == 34_432                   # 2 x 17,216 BN channels
  assert len(flat) == 94 * 5               # 94 BasicConv2d: 5 stem, 3 x 7 (A), 4 (B), 4 x 10 (C), 6 (D), 2 x 9 (E)
  assert flat[("Mixed_6b", "branch7x7_2", "conv", "kernel")].shape == (1, 7, 128, 128)
  assert flat[("Mixed_7c", "branch3x3dbl_3b", "conv", "kernel")].shape == (3, 1, 384, 384)
  assert flat[("Mixed_5d", "branch_pool", "bn", "var")].shape == (64,)


def test_save_load_round_trip_in_torch_names(params, torch_tensors, loaded):
  assert len(torch_tensors) == 470 and not any(k.startswith(("fc.", "AuxLogits.")) for k in torch_tensors)
  for name, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                      "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                      "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
                      "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
                      "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
                      "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
                      "Mixed_7c.branch_pool.bn.weight": (192,)}.items():
    assert torch_tensors[name].shape == shape and torch_tensors[name].dtype == np.float32, name
  flat = traverse_util.flatten_dict(params)
  np.testing.assert_array_equal(torch_tensors["Mixed_6b.branch7x7_2.conv.weight"],
                                flat[("Mixed_6b", "branch7x7_2", "conv", "kernel")].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(torch_tensors["Mixed_6b.branch7x7_2.bn.running_mean"],
                                flat[("Mixed_6b", "branch7x7_2", "bn", "mean")])
  again = traverse_util.flatten_dict(loaded)
  assert set(again) == set(flat)
  for key, value in flat.items():
    assert again[key].dtype == np.float32
    np.testing.assert_array_equal(again[key], value)


def test_load_is_strict_and_ignores_fc_aux_and_counters(torch_tensors, loaded, tmp_path):
  def load(tensors):
    path = str(tmp_path / "file.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return inception.load_inception_params(path)

  name = "Mixed_6c.branch7x7dbl_3.bn.running_var"
  with pytest.raises(ValueError, match=re.escape(f"missing keys ['{name}']")):
    load({k: v for k, v in torch_tensors.items() if k != name})
  with pytest.raises(ValueError, match=re.escape("unexpected keys ['Mixed_7d.branch1x1.conv.weight']")):
    load({**torch_tensors, "Mixed_7d.branch1x1.conv.weight": np.zeros((320, 2048, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=re.escape("Mixed_6b.branch7x7_2.conv.weight (128, 128, 7, 1)")):
    load({**torch_tensors, "Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)})
  missing = str(tmp_path / "nowhere.safetensors")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    inception.load_inception_params(missing)
  extras = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32),
            "AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32),
            "Mixed_5b.branch1x1.bn.num_batches_tracked": np.array(0, np.int64)}
  again = traverse_util.flatten_dict(load({**torch_tensors, **extras}))
  for key, value in traverse_util.flatten_dict(loaded).items():
    np.testing.assert_array_equal(again[key], value)


def test_inception_a_block_matches_reference_without_padded_zeros(torch_tensors, loaded):
  x = np.random.default_rng(1).normal(size=(2, 6, 6, 192)).astype(np.float32)
  got = a_apply({"params": loaded["Mixed_5b"]}, x)
  want = ref_a(torch_tensors, x.astype(np.float64), "Mixed_5b")
  assert got.shape == want.shape == (2, 6, 6, 256) and 0.05 < np.mean(want > 0) < 0.95
  assert max_relative_error(got, want) < RTOL
  # count_include_pad=True (torchvision's InceptionA) changes the border of the pool branch only.
  with_pad = ref_a(torch_tensors, x.astype(np.float64), "Mixed_5b", count_include_pad=True)
  assert max_relative_error(got, with_pad) > 100 * RTOL
  np.testing.assert_allclose(got[:, 1:-1, 1:-1], with_pad[:, 1:-1, 1:-1], rtol=0, atol=RTOL * np.abs(want).max())
  # A mixed-up kernel layout fails the check: input / output swapped (OIHW -> HWOI), or height / width swapped.
  for key, axes in ((("branch3x3dbl_3", "conv", "kernel"), (0, 1, 3, 2)),
                    (("branch5x5_2", "conv", "kernel"), (1, 0, 2, 3))):
    wrong = traverse_util.flatten_dict(loaded["Mixed_5b"])
    wrong[key] = wrong[key].transpose(axes)
    bad = a_apply({"params": traverse_util.unflatten_dict(wrong)}, x)
    assert max_relative_error(bad, want) > 100 * RTOL, key


def test_inception_e2_block_max_pools(torch_tensors, loaded):
  x = np.random.default_rng(2).normal(size=(1, 4, 4, 2048)).astype(np.float32)
  got = e2_apply({"params": loaded["Mixed_7c"]}, x)
  want = ref_e(torch_tensors, x.astype(np.float64), "Mixed_7c", "max")
  assert got.shape == want.shape == (1, 4, 4, 2048)
  assert max_relative_error(got, want) < RTOL
  assert max_relative_error(got, ref_e(torch_tensors, x.astype(np.float64), "Mixed_7c", "avg")) > 100 * RTOL


def test_resize_is_torch_bilinear_without_antialiasing():
  rng = np.random.default_rng(3)
  for size_in, size_out in ((5, 13), (20, 7)):                  # up, down
    x = rng.uniform(size=(1, size_in, size_in, 3)).astype(np.float32)
    got = inception._resize(jnp.asarray(x), size_out)
    np.testing.assert_allclose(got, ref_resize(x.astype(np.float64), size_out), rtol=0, atol=1e-6)
  # jax.image.resize antialiases when shrinking; torch (and we) do not.
  antialiased = jax.image.resize(x, (1, 7, 7, 3), "bilinear")
  assert np.abs(antialiased - ref_resize(x.astype(np.float64), 7)).max() > 1e-2


def test_features_match_reference(torch_tensors, loaded):
  images = np.random.default_rng(4).integers(0, 256, (2, 75, 75, 3), dtype=np.uint8)
  got = inception.inception_features(loaded, images, batch_size=2)
  want = ref_features(torch_tensors, images)
  assert got.shape == (2, inception.FEATURES) and got.dtype == np.float64
  assert 0.1 < np.abs(want).max() < 100 and np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()
  assert max_relative_error(got, want) < RTOL


def test_inception_features_pads_the_last_batch(loaded):
  images = np.random.default_rng(5).integers(0, 256, (3, 75, 75, 3), dtype=np.uint8)
  in_twos = inception.inception_features(loaded, images, batch_size=2)          # batches of 2 and 1 (+1 padding)
  at_once = inception.inception_features(loaded, images, batch_size=3)
  assert in_twos.shape == at_once.shape == (3, 2048)
  np.testing.assert_allclose(in_twos, at_once, rtol=1e-6, atol=1e-6 * np.abs(at_once).max())
