"""The identity loss L_ID: a perceptual distance on internal features of a frozen MoCo v2 ResNet-50, NHWC.

The Transfusion paper trains its VAE with "0.2 L_ID: a perceptual loss on internal features of MoCo v2" but names
neither the layers nor the distance. Our choice, after LPIPS: both images (in [-1, 1], mapped to [0, 1] and
ImageNet-normalised, at their own resolution: no resize) pass through a ResNet-50 as one batch; at the outputs of
layer1..layer4 every feature vector is scaled to unit length over channels, and the squared difference of the two
images' unit features is averaged over positions and channels. The loss is the sum over the 4 layers (no learned
weights). The params are fixed in use (the caller stops their gradient); gradients flow to the images.

The ResNet-50 is torchvision's resnet50 without avgpool and fc: conv1 7x7/2, bn1, ReLU, max-pool 3x3/2, then
layer1..layer4 of [3, 4, 6, 3] Bottleneck blocks (1x1, 3x3, 1x1 convs; widths 64, 128, 256, 512, expanded x4)
with the stride on the 3x3 conv (torchvision's v1.5) and a 1x1 conv + BN shortcut in the first block of each
layer. BatchNorm is frozen: the stored running statistics and affine weights act as a per-channel affine map
(eps 1e-5), so the running mean and variance are params too, and there is no mutable state.

Parameter names mirror the torch names, numeric indices fused with underscores: `conv1.weight` is
`resnet/conv1/kernel`, `layer2.0.bn1.{weight, bias, running_mean, running_var}` is
`resnet/layer2_0/bn1/{scale, bias, mean, var}`, `layer2.0.downsample.0.weight` is
`resnet/layer2_0/downsample_0/kernel`. Kernels are HWIO here and OIHW in torch. The convs and BN weights and
biases hold 23,508,032 parameters (torchvision's resnet50 without fc); the running statistics another 53,120.

Building the weight file from the public MoCo v2 checkpoint (run once where torch and safetensors are installed).
Its state_dict also holds the key encoder (`module.encoder_k.*`) and the queue, which the loader rejects, so keep
only the query encoder; its prefix `module.encoder_q.` and its fc.* MLP head are handled by load_moco_params:

  import torch
  from safetensors.torch import save_file
  state = torch.load("moco_v2_800ep_pretrain.pth.tar", map_location="cpu")["state_dict"]
  save_file({k: v.contiguous() for k, v in state.items() if k.startswith("module.encoder_q.")},
            "moco_v2_resnet50.safetensors")

A plain torchvision resnet50 state_dict (fc.* and num_batches_tracked included) saved the same way loads too.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models import lpips, torch_weights

CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")
VECTOR_AXES = ("vae_out",)
# torchvision resnet50: Bottleneck blocks per layer, each layer's width (its output has EXPANSION x as many
# channels) and stride (taken by the first block's 3x3 conv and shortcut).
LAYER_BLOCKS = (3, 4, 6, 3)
LAYER_WIDTHS = (64, 128, 256, 512)
LAYER_STRIDES = (1, 2, 2, 2)
EXPANSION = 4
STEM_WIDTH = 64
BN_EPS = 1e-5
# ImageNet normalisation of [0, 1] images, as torchvision's (and MoCo's) training.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Torch BatchNorm2d names -> FrozenBatchNorm param names.
BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
MOCO_PREFIX = "module.encoder_q."


def _conv(features, size, stride, name):
  """size x size conv, no bias, torch's padding size // 2."""
  pad = size // 2
  return nn.Conv(features, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_AXES))


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm2d: (x - mean) / sqrt(var + 1e-5) * scale + bias per channel. x: [..., C] -> [..., C]."""

  @nn.compact
  def __call__(self, x):
    inits = {"scale": nn.initializers.ones, "bias": nn.initializers.zeros, "mean": nn.initializers.zeros,
             "var": nn.initializers.ones}
    p = {name: self.param(name, nn.with_logical_partitioning(init, VECTOR_AXES), (x.shape[-1],), jnp.float32)
         for name, init in inits.items()}
    multiplier = p["scale"] * jax.lax.rsqrt(p["var"] + BN_EPS)
    return x * multiplier + (p["bias"] - p["mean"] * multiplier)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): x [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), 4 width]."""
  width: int
  stride: int = 1
  downsample: bool = False      # 1x1 conv + BN shortcut (first block of a layer) instead of the identity

  @nn.compact
  def __call__(self, x):
    h = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.width, 1, 1, "conv1")(x)))
    h = nn.relu(FrozenBatchNorm(name="bn2")(_conv(self.width, 3, self.stride, "conv2")(h)))
    h = FrozenBatchNorm(name="bn3")(_conv(self.width * EXPANSION, 1, 1, "conv3")(h))
    if self.downsample:
      x = FrozenBatchNorm(name="downsample_1")(_conv(self.width * EXPANSION, 1, self.stride, "downsample_0")(x))
    return nn.relu(h + x)


class ResNet50Features(nn.Module):
  """torchvision's resnet50 up to layer4, with frozen BatchNorm.

  x: [B, H, W, 3] (ImageNet-normalised) -> (layer1 [B, H/4, W/4, 256], layer2 [B, H/8, W/8, 512],
  layer3 [B, H/16, W/16, 1024], layer4 [B, H/32, W/32, 2048]); sizes not divisible are rounded up, as in torch.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(FrozenBatchNorm(name="bn1")(_conv(STEM_WIDTH, 7, 2, "conv1")(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    taps = []
    for i, (blocks, width, stride) in enumerate(zip(LAYER_BLOCKS, LAYER_WIDTHS, LAYER_STRIDES), 1):
      for j in range(blocks):
        x = Bottleneck(width, stride if j == 0 else 1, downsample=j == 0, name=f"layer{i}_{j}")(x)
      taps.append(x)
    return tuple(taps)


class IdentityLoss(nn.Module):
  """L_ID, computed in float32.  x, y: [B, H, W, 3] in [-1, 1] -> [B]."""

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape or x.shape[-1] != 3:
      raise ValueError(f"IdentityLoss needs two [B, H, W, 3] images of one shape, got {x.shape} and {y.shape}")
    mean, std = jnp.array(IMAGENET_MEAN, jnp.float32), jnp.array(IMAGENET_STD, jnp.float32)
    both = ((jnp.concatenate([x, y]).astype(jnp.float32) + 1) / 2 - mean) / std    # one ResNet pass for both
    per_layer = []
    for f in ResNet50Features(name="resnet")(both):
      a, b = f[:len(x)], f[len(x):]
      per_layer.append(jnp.mean(jnp.square(lpips.unit_difference(a, b)), axis=(1, 2, 3)))
    return sum(per_layer)


def _flax_key(module: str) -> tuple:
  """Torch module name -> flax module path: "conv1" -> ("conv1",), "layer2.0.downsample.0" -> ("layer2_0",
  "downsample_0")."""
  parts = module.split(".")
  return (module,) if len(parts) == 1 else (f"{parts[0]}_{parts[1]}", "_".join(parts[2:]))


def _torch_layout() -> dict:
  """{torch name: (flax key path, torch shape)} for every ResNet-50 weight IdentityLoss uses."""
  layout = {}

  def conv_bn(conv, bn, c_in, c_out, size):
    layout[f"{conv}.weight"] = (("resnet", *_flax_key(conv), "kernel"), (c_out, c_in, size, size))
    for torch_name, flax_name in BN_NAMES.items():
      layout[f"{bn}.{torch_name}"] = (("resnet", *_flax_key(bn), flax_name), (c_out,))

  conv_bn("conv1", "bn1", 3, STEM_WIDTH, 7)
  c_in = STEM_WIDTH
  for i, (blocks, width) in enumerate(zip(LAYER_BLOCKS, LAYER_WIDTHS), 1):
    for j in range(blocks):
      block, c_out = f"layer{i}.{j}", width * EXPANSION
      for k, (c_from, c_to, size) in enumerate(((c_in, width, 1), (width, width, 3), (width, c_out, 1)), 1):
        conv_bn(f"{block}.conv{k}", f"{block}.bn{k}", c_from, c_to, size)
      if j == 0:
        conv_bn(f"{block}.downsample.0", f"{block}.downsample.1", c_in, c_out, 1)
      c_in = c_out
  return layout


def _ignored(name: str) -> bool:
  """Torch keys IdentityLoss has no use for: the classifier / MoCo MLP head and BN's batch counters."""
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def load_moco_params(path: str) -> dict:
  """IdentityLoss params (float32 numpy arrays, for IdentityLoss().apply({"params": params}, x, y)) from a
  safetensors file of a torchvision resnet50 state_dict, or of a MoCo query encoder (every key prefixed
  `module.encoder_q.`, which is stripped). fc.* and num_batches_tracked keys are ignored; anything else missing,
  extra or mis-shaped is a ValueError.
  """
  tensors = torch_weights.read_tensors(path, "MoCo / ResNet-50")
  if tensors and all(name.startswith(MOCO_PREFIX) for name in tensors):
    tensors = {name[len(MOCO_PREFIX):]: value for name, value in tensors.items()}
  tensors = {name: value for name, value in tensors.items() if not _ignored(name)}
  return torch_weights.params_from_torch(tensors, _torch_layout(), "MoCo / ResNet-50", path)


def save_moco_params(path: str, params) -> None:
  """Write IdentityLoss params to a safetensors file in the torchvision resnet50 names and layouts (no fc, no
  prefix) that load_moco_params reads."""
  torch_weights.save_torch(path, params, _torch_layout())
