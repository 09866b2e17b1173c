"""KL-regularised convolutional VAE (Esser et al. 2021, Rombach et al. 2022 "LDM"), diffusers AutoencoderKL layout.

Transfusion (§4.1) runs diffusion on the latents of such a VAE: the encoder maps a [-1, 1] image [H, W, 3] to
a diagonal Gaussian over latents [H/f, W/f, c] (mean and log-variance), the decoder maps a latent back to an
image. Training minimises reconstruction error plus a small weight times kl_divergence to N(0, I), which keeps
the latent space smooth enough to sample from. The paper trains its own 86M-parameter VAE with c = 8 and f = 8;
VAEConfig() is the LDM/Stable Diffusion architecture with c = 8, measured at 83,709,419 (~84M) parameters
(83,653,863 with c = 4, the Stable Diffusion VAE).

Encoder: conv_in, then per level `layers_per_block` ResnetBlocks and a stride-2 downsampler (all levels but the
last), a mid block (ResnetBlock, single-head self-attention over all positions, ResnetBlock), GroupNorm, SiLU
and conv_out to 2c moments, then the 1x1 quant_conv. Decoder: the 1x1 post_quant_conv, conv_in, mid block, per
level (widest first) `layers_per_block + 1` ResnetBlocks and a nearest-neighbour 2x upsampler (all levels but the
last), GroupNorm, SiLU, conv_out. Images are NHWC.

VQModel is the VQ-VAE of the Chameleon baseline (§4.1, App. A) on the same encoder and decoder: the encoder's
latent_channels outputs are projected to vq_dim (paper: 8) and each latent vector is replaced by its nearest code
in a learned codebook (models/quantizer.py); it encodes images to code indices and decodes indices to images.

The parameter tree mirrors the diffusers state dict: a Flax module name is the diffusers dotted path with each
numeric index fused onto the previous part by "_" (diffusers `decoder.up_blocks.0.resnets.1.conv1.weight` is
Flax ('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')), so diffusers safetensors files load with
load_diffusers and are written by save_diffusers.
"""
import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from tfusion.models import quantizer

CONV_AXES = ("conv_height", "conv_width", "vae_in", "vae_out")
DENSE_AXES = ("vae_in", "vae_out")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LOGVAR_RANGE = (-30.0, 20.0)                # diffusers DiagonalGaussianDistribution clamps logvar to this
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture, in diffusers AutoencoderKL config names; block_out_channels are widths, highest resolution first."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 8
  norm_num_groups: int = 32

  def __post_init__(self):
    bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {self.block_out_channels}: widths {bad} are not divisible by "
                       f"norm_num_groups {self.norm_num_groups}")

  @property
  def downsample(self) -> int:
    """f: image size / latent size."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping) -> "VAEConfig":
    """From a diffusers AutoencoderKL config.json dict; keys that do not shape the weights are ignored."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in names if name not in d]
    if missing:
      raise ValueError(f"diffusers VAE config lacks {missing}")
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"act_fn {d['act_fn']!r} is not supported (only 'silu')")
    levels = len(d["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      if key in d and list(d[key]) != [block] * levels:
        raise ValueError(f"{key} {d[key]} is not supported (only {levels} x {block!r})")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      if not d.get(key, True):
        raise ValueError(f"{key} = false is not supported")
    values = {name: d[name] for name in names}
    return cls(**values | {"block_out_channels": tuple(values["block_out_channels"])})

  def to_diffusers(self) -> dict:
    """The config.json dict of the equivalent diffusers AutoencoderKL."""
    levels = len(self.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups}


def _conv(features, size, name=None, strides=1, padding=None):
  """size x size conv, "same" zero padding unless `padding` is given."""
  pad = size // 2
  padding = ((pad, pad), (pad, pad)) if padding is None else padding
  return nn.Conv(features, (size, size), strides=(strides, strides), padding=padding, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, CONV_AXES[-1:]))


def _dense(features, name):
  return nn.Dense(features, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), DENSE_AXES),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, DENSE_AXES[-1:]))


def _group_norm(groups, name):
  """GroupNorm with eps 1e-6 as in diffusers; two-pass variance (large decoder activations lose the one-pass one)."""
  return nn.GroupNorm(groups, epsilon=1e-6, use_fast_variance=False, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("vae_out",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vae_out",)))


class ResnetBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus x (1x1 conv_shortcut if widths differ).

  x: [N, H, W, C_in] -> [N, H, W, features].
  """
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, 3, "conv1")(nn.silu(_group_norm(self.groups, "norm1")(x)))
    h = _conv(self.features, 3, "conv2")(nn.silu(_group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """Pre-GroupNorm single-head self-attention over all H*W positions (head dim C), residual.

  x: [N, H, W, C] -> [N, H, W, C].
  """
  groups: int

  @nn.compact
  def __call__(self, x):
    n, hh, ww, c = x.shape
    y = _group_norm(self.groups, "group_norm")(x).reshape(n, hh * ww, c)
    q, k, v = (_dense(c, name)(y) for name in ("to_q", "to_k", "to_v"))
    probs = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / np.sqrt(c), axis=-1)
    return x + _dense(c, "to_out_0")(jnp.einsum("nqk,nkc->nqc", probs, v)).reshape(n, hh, ww, c)


class MidBlock(nn.Module):
  """ResnetBlock, Attention, ResnetBlock at the lowest resolution: [N, H, W, C] -> [N, H, W, C]."""
  groups: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    x = Attention(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
  """Zero-pad bottom and right by 1, 3x3 conv with stride 2: [N, H, W, C] -> [N, H/2, W/2, C]."""

  @nn.compact
  def __call__(self, x):
    return _conv(x.shape[-1], 3, "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, 3x3 conv: [N, H, W, C] -> [N, 2H, 2W, C]."""

  @nn.compact
  def __call__(self, x):
    return _conv(x.shape[-1], 3, "conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nn.Module):
  """num_layers ResnetBlocks, then a Downsample if `downsample`: [N, H, W, C_in] -> [N, H', W', features]."""
  features: int
  num_layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(x)
    return Downsample(name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
  """num_layers ResnetBlocks, then an Upsample if `upsample`: [N, H, W, C_in] -> [N, H', W', features]."""
  features: int
  num_layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(x)
    return Upsample(name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
  """images [N, H, W, in_channels] -> moments [N, H/f, W/f, 2 * latent_channels] (before quant_conv); with
  double_z False (the VQ-VAE) [N, H/f, W/f, latent_channels]."""
  config: VAEConfig
  double_z: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    widths, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
    x = _conv(widths[0], 3, "conv_in")(x)
    for i, width in enumerate(widths):
      x = DownBlock(width, cfg.layers_per_block, cfg.norm_num_groups, i < last, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, name="mid_block")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv((2 if self.double_z else 1) * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  """latents [N, h, w, latent_channels] (after post_quant_conv) -> images [N, h*f, w*f, out_channels]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    widths, last = cfg.block_out_channels[::-1], len(cfg.block_out_channels) - 1
    x = _conv(widths[0], 3, "conv_in")(x)
    x = MidBlock(cfg.norm_num_groups, name="mid_block")(x)
    for i, width in enumerate(widths):
      x = UpBlock(width, cfg.layers_per_block + 1, cfg.norm_num_groups, i < last, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The VAE. Call encode / decode through apply(..., method=AutoencoderKL.encode); init(key, images) makes all
  parameters."""
  config: VAEConfig

  def setup(self):
    c = self.config.latent_channels
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)
    self.quant_conv = _conv(2 * c, 1)
    self.post_quant_conv = _conv(c, 1)

  def encode(self, images):
    """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
    _check_image_size(images, self.config.downsample)
    mean, logvar = jnp.split(self.quant_conv(self.encoder(images)), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents):
    """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, images, key=None):
    """images [B, H, W, in_channels] -> (reconstruction [B, H, W, out_channels], mean, logvar).

    The decoded latent is a posterior sample mean + exp(logvar / 2) * N(0, 1) when `key` is given, else the mean.
    """
    mean, logvar = self.encode(images)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


class VQModel(nn.Module):
  """The VQ-VAE (diffusers VQModel layout): encoder (double_z False) -> 1x1 quant_conv to vq_dim -> nearest code
  of `quantize` (models/quantizer.py) -> 1x1 post_quant_conv to latent_channels -> decoder. Call encode / embed /
  decode through apply(..., method=VQModel.encode); init(key, images) makes all parameters."""
  config: VAEConfig
  codebook_size: int
  vq_dim: int

  def setup(self):
    self.encoder = Encoder(self.config, double_z=False)
    self.decoder = Decoder(self.config)
    self.quant_conv = _conv(self.vq_dim, 1)
    self.quantize = quantizer.VectorQuantizer(self.codebook_size, self.vq_dim)
    self.post_quant_conv = _conv(self.config.latent_channels, 1)

  def project(self, images):
    """images [B, H, W, in_channels] in [-1, 1] -> encoder outputs z_e [B, H/f, W/f, vq_dim] (before quantising)."""
    _check_image_size(images, self.config.downsample)
    return self.quant_conv(self.encoder(images))

  def encode(self, images):
    """images [B, H, W, in_channels] in [-1, 1] -> code indices int32 [B, H/f, W/f]."""
    return self.quantize(self.project(images))[1]

  def embed(self, codes):
    """code indices int [B, h, w] -> quantised vectors [B, h, w, vq_dim]."""
    return self.quantize.embed(codes)

  def decode(self, codes):
    """code indices int [B, h, w] -> images [B, h*f, w*f, out_channels]."""
    return self.decode_vectors(self.embed(codes))

  def decode_vectors(self, z):
    """vectors [B, h, w, vq_dim] -> images [B, h*f, w*f, out_channels]."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, images):
    """images [B, H, W, in_channels] -> (reconstruction [B, H, W, out_channels], z_e, z_q, codes).

    z_e [B, h, w, vq_dim] are the encoder outputs, z_q the nearest codes (differentiable in the codebook), codes
    int32 [B, h, w] their indices; the decoder reads z_q with the straight-through gradient to z_e.
    """
    z_e = self.project(images)
    z_q, codes = self.quantize(z_e)
    return self.decode_vectors(quantizer.straight_through(z_e, z_q)), z_e, z_q, codes


def _check_image_size(images, f: int) -> None:
  if images.shape[1] % f or images.shape[2] % f:
    raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the VAE downsampling {f}")


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) per example: mean, logvar [B, ...] -> [B]."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def _diffusers_name(path) -> str:
  """Flax param path -> diffusers key: ('decoder', 'up_blocks_0', 'upsamplers_0', 'conv', 'kernel') ->
  decoder.up_blocks.0.upsamplers.0.conv.weight; GroupNorm scales are weights too."""
  *modules, leaf = path
  return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + ["bias" if leaf == "bias" else "weight"])


def _modern_name(key: str) -> str:
  """Legacy diffusers attention names (query, key, value, proj_attn) -> to_q, to_k, to_v, to_out.0."""
  return re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.\w+)$",
                lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + m[3], key)


def _to_torch(value: np.ndarray) -> np.ndarray:
  """Flax layout (HWIO conv, [in, out] dense) -> torch layout (OIHW, [out, in])."""
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value


def _from_torch(value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T if value.ndim == 2 else value


def _param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape, from an abstract init."""
  f = config.downsample
  images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  variables = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)
  return {path: v.shape for path, v in traverse_util.flatten_dict(nn.meta.unbox(variables["params"])).items()}


def params_from_diffusers(tensors: Mapping[str, np.ndarray], config: VAEConfig) -> dict:
  """A diffusers AutoencoderKL state dict (torch layout) -> the Flax params tree of AutoencoderKL(config).

  Strict: missing keys, unexpected keys and shape mismatches raise one ValueError listing them all. Legacy
  attention names (query, key, value, proj_attn) and attention weights stored as 1x1 convs are accepted.
  """
  expected = {_diffusers_name(path): (path, shape) for path, shape in _param_shapes(config).items()}
  given = {}
  for key in tensors:
    name = _modern_name(key)
    if name in given:
      raise ValueError(f"{key} and {given[name]} are the same parameter {name}")
    given[name] = key
  problems = [f"missing {name}" for name in sorted(expected.keys() - given.keys())]
  problems += [f"unexpected {given[name]}" for name in sorted(given.keys() - expected.keys())]
  flat = {}
  for name in sorted(expected.keys() & given.keys()):
    (path, shape), key = expected[name], given[name]
    value = np.asarray(tensors[key])
    torch_shape = _to_torch(np.empty(shape, np.bool_)).shape
    if len(shape) == 2 and value.shape[2:] == (1, 1):                  # attention projection stored as 1x1 conv
      value = value[:, :, 0, 0]
    if value.shape != torch_shape:
      problems.append(f"{key}: expected shape {torch_shape}, got {np.shape(tensors[key])}")
      continue
    flat[path] = _from_torch(value).astype(np.float32)
  if problems:
    raise ValueError(f"diffusers state dict does not match {config}:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


def params_to_diffusers(params) -> dict[str, np.ndarray]:
  """Flax params tree of AutoencoderKL -> diffusers state dict (torch layout, contiguous float32)."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  return {_diffusers_name(path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32))) for path, v in flat.items()}


def load_diffusers(path) -> tuple[VAEConfig, dict]:
  """(config, params) from a diffusers VAE directory (config.json, diffusion_pytorch_model.safetensors) or from a
  .safetensors file with config.json beside it."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  weights = path / WEIGHTS_NAME if path.is_dir() else path
  if weights.suffix != ".safetensors":
    raise ValueError(f"{path} is neither a diffusers VAE directory nor a .safetensors file")
  config_path = weights.parent / CONFIG_NAME
  for file in (weights, config_path):
    if not file.is_file():
      raise FileNotFoundError(f"{file} not found")
  try:
    config = VAEConfig.from_diffusers(json.loads(config_path.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: {e}") from e
  try:
    tensors = safetensors.numpy.load_file(weights)
  except (safetensors.SafetensorError, OSError, KeyError) as e:     # KeyError: a dtype numpy lacks, e.g. 'BF16'
    raise ValueError(f"{weights} is not a readable safetensors file: {e!r}") from e
  try:
    return config, params_from_diffusers(tensors, config)
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from e


def save_diffusers(directory, config: VAEConfig, params) -> None:
  """Write config.json and diffusion_pytorch_model.safetensors, the layout diffusers' from_pretrained reads."""
  tensors = params_to_diffusers(params)
  params_from_diffusers(tensors, config)                                  # raises if params do not fit config
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
