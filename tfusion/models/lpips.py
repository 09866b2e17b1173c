"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk, NHWC.

Both images pass through LPIPS's fixed affine scaling and the 13 conv layers of an ImageNet VGG16. At the last
ReLU of each of the 5 stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) every feature vector is scaled to unit
length over channels; the squared difference of the two images' unit features goes through a learned non-negative
1x1 linear layer (C -> 1, no bias) and is averaged over positions. The distance is the sum over the 5 taps.
Both images go through the VGG as one batch. The params are fixed in use (the caller stops their gradient);
gradients flow to the images. random_lpips_params is the fallback without a weight file: with random VGG
features the distance is still a smooth image distance, but not a perceptual one.

Parameter names mirror the torch names: torchvision's `features.{i}.weight` / `features.{i}.bias` (i the index in
vgg16().features) are `vgg/features_{i}/kernel` / `bias`; lpips' `lin{k}.model.1.weight` is `lin{k}/kernel`.
Kernels are HWIO here and OIHW in torch. The VGG16 features hold 14,714,688 parameters, the lin layers 1,472.

Building the weight file (run once where torch, torchvision and safetensors are installed; `vgg.pth` is
lpips/weights/v0.1/vgg.pth from the `lpips` package or github.com/richzhang/PerceptualSimilarity):

  import torch, torchvision
  from safetensors.torch import save_file
  vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
  tensors = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
  tensors.update(torch.load("vgg.pth", map_location="cpu"))            # lin{k}.model.1.weight, k = 0..4
  save_file({k: v.float().contiguous() for k, v in tensors.items()}, "lpips_vgg16.safetensors")
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models import torch_weights

CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")
# Indices of the conv layers in torchvision's vgg16().features, by stage (a ReLU follows each conv; the
# 2x2 max-pools sit between stages), and each stage's width.
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: images in [-1, 1] -> (x - shift) / scale, roughly ImageNet mean/std normalisation.
SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)
EPS = 1e-10


def _nonnegative_init(key, shape, dtype=jnp.float32):
  """Uniform in [0, 2 / C_in): each tap starts near the channel mean of its squared differences."""
  return jax.random.uniform(key, shape, dtype, 0.0, 2.0 / shape[-2])


def _conv(features, size, name, kernel_init=nn.initializers.he_normal(), use_bias=True):
  pad = size // 2
  return nn.Conv(features, (size, size), padding=((pad, pad), (pad, pad)), use_bias=use_bias, name=name,
                 kernel_init=nn.with_logical_partitioning(kernel_init, CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, CONV_AXES[-1:]))


def unit_channels(f):
  """f / (|f| + EPS), the norm over channels. The where keeps the gradient finite (not NaN) where f = 0."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return f / (norm + EPS)


def unit_difference(a, b):
  """unit_channels(a) - unit_channels(b) of features [B, H, W, C]. XLA may round the two normalisations
  differently (~1e-8); where the features agree bitwise the difference is exactly 0, so a distance of an
  image to itself is exactly 0."""
  return jnp.where(jnp.all(a == b, axis=-1, keepdims=True), 0.0, unit_channels(a) - unit_channels(b))


class VGG16Features(nn.Module):
  """The 13 conv3x3 (pad 1) + ReLU layers of torchvision's vgg16 `features`, 2x2 max-pool between stages.

  x: [B, H, W, 3] -> (relu1_2 [B, H, W, 64], relu2_2 [B, H/2, W/2, 128], relu3_3 [B, H/4, W/4, 256],
  relu4_3 [B, H/8, W/8, 512], relu5_3 [B, H/16, W/16, 512]); odd sizes are floored by the pools.
  """

  @nn.compact
  def __call__(self, x):
    taps = []
    for indices, width in zip(VGG16_STAGES, VGG16_WIDTHS):
      if taps:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i in indices:
        x = nn.relu(_conv(width, 3, f"features_{i}")(x))
      taps.append(x)
    return tuple(taps)


class LPIPS(nn.Module):
  """LPIPS distance, computed in float32.  x, y: [B, H, W, 3] in [-1, 1] (H, W >= 16) -> [B]."""

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape or x.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two [B, H, W, 3] images of one shape, got {x.shape} and {y.shape}")
    shift, scale = jnp.array(SHIFT, jnp.float32), jnp.array(SCALE, jnp.float32)
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale    # one VGG pass for both images
    per_tap = []
    for k, f in enumerate(VGG16Features(name="vgg")(both)):
      a, b = f[:len(x)], f[len(x):]
      diff = unit_difference(a, b)
      lin = _conv(1, 1, f"lin{k}", kernel_init=_nonnegative_init, use_bias=False)
      per_tap.append(jnp.mean(lin(jnp.square(diff)), axis=(1, 2, 3)))
    return sum(per_tap)


def _torch_layout() -> dict:
  """{torch name: (flax key path, torch shape)} for every LPIPS weight."""
  layout, c_in = {}, 3
  for indices, width in zip(VGG16_STAGES, VGG16_WIDTHS):
    for i in indices:
      layout[f"features.{i}.weight"] = (("vgg", f"features_{i}", "kernel"), (width, c_in, 3, 3))
      layout[f"features.{i}.bias"] = (("vgg", f"features_{i}", "bias"), (width,))
      c_in = width
  for k, width in enumerate(VGG16_WIDTHS):
    layout[f"lin{k}.model.1.weight"] = ((f"lin{k}", "kernel"), (1, width, 1, 1))
  return layout


def load_lpips_params(path: str) -> dict:
  """LPIPS params (float32 numpy arrays, for LPIPS().apply({"params": params}, x, y)) from a safetensors file.

  The file holds exactly the torch names and OIHW shapes of _torch_layout (see the module docstring); anything
  missing, extra or mis-shaped is a ValueError.
  """
  tensors = torch_weights.read_tensors(path, "LPIPS")
  return torch_weights.params_from_torch(tensors, _torch_layout(), "LPIPS", path)


def save_lpips_params(path: str, params) -> None:
  """Write LPIPS params to a safetensors file in the torch names and layouts that load_lpips_params reads."""
  torch_weights.save_torch(path, params, _torch_layout())


def random_lpips_params(key) -> dict:
  """LPIPS params with random VGG features (He-normal kernels, zero biases) and non-negative lin weights."""
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  return nn.unbox(jax.jit(LPIPS().init)(key, x, x)["params"])
