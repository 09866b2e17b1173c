"""The FID Inception-v3, NHWC: the 2048-d pool3 features that FID compares.

This is the network of pytorch-fid's `fid_inception_v3` (TF's 2015-12-05 inception graph ported to torch, weights
`pt_inception-2015-12-05-6726825d.pth`): torchvision's Inception3 without AuxLogits, with the FID patches of its
mixed blocks: the 3x3 average pools of Mixed_5b..5d, 6b..6e and 7b average over the valid positions only
(TF's, torch's count_include_pad=False), and Mixed_7c pools its branch_pool with a 3x3 max-pool, stride 1. Every
conv is torchvision's BasicConv2d: conv without bias, BatchNorm (eps 1e-3, inference mode: the running statistics
are params too, there is no mutable state), ReLU. The features are the global average of Mixed_7c's output.

Input protocol (pytorch-fid's): images float in [0, 1], [B, H, W, 3] (RGB), resized bilinearly to 299 x 299 as
F.interpolate(mode="bilinear", align_corners=False) does: half-pixel centres and no antialiasing when shrinking
(jax.image.resize would antialias), then mapped to [-1, 1] by 2x - 1; no ImageNet mean/std normalisation.
inception_features takes uint8 images and divides by 255, as torchvision's ToTensor in pytorch-fid's loader.

Parameter names mirror the torch names: `Mixed_6b.branch7x7_2.conv.weight` is `Mixed_6b/branch7x7_2/conv/kernel`,
`Mixed_6b.branch7x7_2.bn.{weight, bias, running_mean, running_var}` is `Mixed_6b/branch7x7_2/bn/{scale, bias,
mean, var}`. Kernels are HWIO here and OIHW in torch. The convs and BN weights and biases hold 21,785,568
parameters (torchvision's inception_v3 without AuxLogits and fc), the running statistics another 34,432.

Building the weight file (run once where torch and safetensors are installed); fc.*, AuxLogits.* and
num_batches_tracked keys are ignored by load_inception_params:

  import torch, safetensors.torch
  state = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, "fid_inception.safetensors")
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tfusion.models import torch_weights

FEATURES = 2048
SIZE = 299                      # the network's input resolution
BN_EPS = 1e-3
# Flax param name -> the torch name's last part.
TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
WHAT = "FID Inception"
# Logical axis names: convs and vectors are laid out like the VAE's convs (sharding.RULES).
CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")
VECTOR_AXES = ("vae_out",)


class BatchNorm(nn.Module):
  """Inference-mode BatchNorm2d, running statistics as params: (x - mean) / sqrt(var + eps) * scale + bias.
  x: [..., C] -> [..., C]."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    def vector(name, init):
      return self.param(name, nn.with_logical_partitioning(init, VECTOR_AXES), x.shape[-1:], jnp.float32)

    scale, bias = vector("scale", nn.initializers.ones), vector("bias", nn.initializers.zeros)
    mean, var = vector("mean", nn.initializers.zeros), vector("var", nn.initializers.ones)
    gain = scale * jax.lax.rsqrt(var + self.eps)
    return (x - mean) * gain + bias


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv (no bias), BatchNorm (eps 1e-3), ReLU; kernel and padding (h, w) as torch's
  (padding 0 is VALID).  x: [B, H, W, C] -> [B, (H + 2 pad_h - k_h) // stride + 1, ..., features]."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=[(p, p) for p in self.padding],
                use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv",
                kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_AXES))(x)
    return nn.relu(BatchNorm(name="bn")(x))


def _conv(name, features, kernel=1, stride=1, padding=0):
  """A BasicConv2d named as its torch module; kernel and padding are ints (square) or (h, w)."""
  return BasicConv2d(features, _pair(kernel), stride, _pair(padding), name=name)


def _chain(x, *layers):
  for layer in layers:
    x = layer(x)
  return x


def _split_3x3(x, name):
  """InceptionE's 1x3 and 3x1 convs (name + "a", name + "b") side by side: [B, H, W, C] -> [B, H, W, 768]."""
  return jnp.concatenate([_conv(f"{name}a", 384, (1, 3), padding=(0, 1))(x),
                          _conv(f"{name}b", 384, (3, 1), padding=(1, 0))(x)], axis=-1)


def _avg_pool_3x3(x):
  """3x3 average, stride 1, padding 1, over the valid positions only (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride):
  """3x3 max-pool: stride 2 unpadded (torch's MaxPool2d(3, 2)), or stride 1 with padding 1."""
  padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class FidInceptionA(nn.Module):
  """Mixed_5b/5c/5d.  x: [B, H, W, C] -> [B, H, W, 224 + pool_features]."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1x1 = _conv("branch1x1", 64)(x)
    b5x5 = _chain(x, _conv("branch5x5_1", 48), _conv("branch5x5_2", 64, 5, padding=2))
    b3x3 = _chain(x, _conv("branch3x3dbl_1", 64), _conv("branch3x3dbl_2", 96, 3, padding=1),
                  _conv("branch3x3dbl_3", 96, 3, padding=1))
    pool = _conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1x1, b5x5, b3x3, pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a.  x: [B, H, W, C] -> [B, (H - 1) // 2, (W - 1) // 2, 480 + C]."""

  @nn.compact
  def __call__(self, x):
    b3x3 = _conv("branch3x3", 384, 3, stride=2)(x)
    b3x3dbl = _chain(x, _conv("branch3x3dbl_1", 64), _conv("branch3x3dbl_2", 96, 3, padding=1),
                     _conv("branch3x3dbl_3", 96, 3, stride=2))
    return jnp.concatenate([b3x3, b3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class FidInceptionC(nn.Module):
  """Mixed_6b..6e, factorised 7x7 convs of channels_7x7 channels.  x: [B, H, W, C] -> [B, H, W, 768]."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row = functools.partial(_conv, kernel=(1, 7), padding=(0, 3))
    col = functools.partial(_conv, kernel=(7, 1), padding=(3, 0))
    b1x1 = _conv("branch1x1", 192)(x)
    b7x7 = _chain(x, _conv("branch7x7_1", c7), row("branch7x7_2", c7), col("branch7x7_3", 192))
    b7x7dbl = _chain(x, _conv("branch7x7dbl_1", c7), col("branch7x7dbl_2", c7), row("branch7x7dbl_3", c7),
                     col("branch7x7dbl_4", c7), row("branch7x7dbl_5", 192))
    pool = _conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1x1, b7x7, b7x7dbl, pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a.  x: [B, H, W, C] -> [B, (H - 1) // 2, (W - 1) // 2, 512 + C]."""

  @nn.compact
  def __call__(self, x):
    b3x3 = _chain(x, _conv("branch3x3_1", 192), _conv("branch3x3_2", 320, 3, stride=2))
    b7x7x3 = _chain(x, _conv("branch7x7x3_1", 192), _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3)),
                    _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0)), _conv("branch7x7x3_4", 192, 3, stride=2))
    return jnp.concatenate([b3x3, b7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class FidInceptionE(nn.Module):
  """Mixed_7b (pool "avg": FIDInceptionE_1) and Mixed_7c (pool "max": FIDInceptionE_2).
  x: [B, H, W, C] -> [B, H, W, 2048]."""
  pool: str

  @nn.compact
  def __call__(self, x):
    if self.pool not in ("avg", "max"):
      raise ValueError(f"FidInceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    b1x1 = _conv("branch1x1", 320)(x)
    b3x3 = _split_3x3(_conv("branch3x3_1", 384)(x), "branch3x3_2")
    b3x3dbl = _split_3x3(_chain(x, _conv("branch3x3dbl_1", 448), _conv("branch3x3dbl_2", 384, 3, padding=1)),
                         "branch3x3dbl_3")
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
    return jnp.concatenate([b1x1, b3x3, b3x3dbl, _conv("branch_pool", 192)(pooled)], axis=-1)


def _resize(images, size):
  """Bilinear resize to size x size as torch's F.interpolate(align_corners=False): half-pixel centres, edge
  samples clamped, no antialiasing.  images: [B, H, W, C] -> [B, size, size, C]."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  scale = jnp.array([size / h, size / w], images.dtype)
  return jax.image.scale_and_translate(images, (b, size, size, c), (1, 2), scale, jnp.zeros(2, images.dtype),
                                       method="linear", antialias=False)


class FidInception(nn.Module):
  """images: [B, H, W, 3] float in [0, 1] -> pool3 features [B, 2048] float32."""

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FidInception needs [B, H, W, 3] images, got shape {images.shape}")
    x = 2 * _resize(images.astype(jnp.float32), SIZE) - 1
    x = _chain(x, _conv("Conv2d_1a_3x3", 32, 3, stride=2), _conv("Conv2d_2a_3x3", 32, 3),
               _conv("Conv2d_2b_3x3", 64, 3, padding=1))                                   # [B, 147, 147, 64]
    x = _chain(_max_pool_3x3(x, 2), _conv("Conv2d_3b_1x1", 80), _conv("Conv2d_4a_3x3", 192, 3))  # 71 x 71 x 192
    x = _chain(_max_pool_3x3(x, 2),                                                         # 35 x 35 x 192
               FidInceptionA(32, name="Mixed_5b"), FidInceptionA(64, name="Mixed_5c"),
               FidInceptionA(64, name="Mixed_5d"), InceptionB(name="Mixed_6a"),           # 17 x 17 x 768
               *(FidInceptionC(c7, name=f"Mixed_6{s}") for s, c7 in zip("bcde", (128, 160, 160, 192))),
               InceptionD(name="Mixed_7a"),                                                 # 8 x 8 x 1280
               FidInceptionE("avg", name="Mixed_7b"), FidInceptionE("max", name="Mixed_7c"))  # 8 x 8 x 2048
    return jnp.mean(x, axis=(1, 2))


@functools.cache
def _torch_layout() -> torch_weights.Layout:
  """{torch name: (flax key path, torch shape)} for every FidInception param, read off the module's shapes."""
  shapes = jax.eval_shape(FidInception().init, jax.random.key(0), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3),
                                                                                      jnp.float32))
  layout = {}
  for key, leaf in traverse_util.flatten_dict(nn.unbox(shapes["params"])).items():
    shape = tuple(leaf.shape[i] for i in (3, 2, 0, 1)) if len(leaf.shape) == 4 else tuple(leaf.shape)  # OIHW
    layout[".".join((*key[:-1], TORCH_NAMES[key[-1]]))] = (key, shape)
  return layout


def _ignored(name: str) -> bool:
  """Torch keys the features do not use: the classifier, the auxiliary classifier, BN's batch counters."""
  return name.startswith(("fc.", "AuxLogits.")) or name.endswith(".num_batches_tracked")


def load_inception_params(path: str) -> dict:
  """FidInception params (float32 numpy, for FidInception().apply({"params": params}, images)) from a safetensors
  file of pytorch-fid's FID Inception state_dict. fc.*, AuxLogits.* and num_batches_tracked keys are ignored;
  anything else missing, extra or mis-shaped is a ValueError naming the torch keys."""
  tensors = {k: v for k, v in torch_weights.read_tensors(path, WHAT).items() if not _ignored(k)}
  return torch_weights.params_from_torch(tensors, _torch_layout(), WHAT, path)


def save_inception_params(path: str, params) -> None:
  """Write FidInception params to a safetensors file in the torch names and layouts load_inception_params reads
  (no fc)."""
  torch_weights.save_torch(path, params, _torch_layout())


@jax.jit
def _features(params, images_uint8):
  return FidInception().apply({"params": params}, images_uint8.astype(jnp.float32) / 255)


def inception_features(params, images_uint8: np.ndarray, batch_size: int = 50) -> np.ndarray:
  """pool3 features of uint8 images, min(batch_size, N) at a time (the last batch zero-padded, its padding
  dropped). images_uint8: [N, H, W, 3] uint8 -> [N, 2048] float64."""
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"inception_features needs uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  batch_size = min(batch_size, len(images))
  out = np.empty((len(images), FEATURES), np.float64)
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), np.uint8)])
    out[start:start + count] = np.asarray(_features(params, batch))[:count]
  return out
