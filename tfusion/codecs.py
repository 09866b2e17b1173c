"""Latent codecs: how images become the continuous latents that diffusion runs on, and back.

Every codec maps uint8 images [..., H, W, 3] to float latents [..., H/f, W/f, c] and back, and
says how far latents may range (the sampler clips its x0 estimate to that range when it is set).
`identity` uses pixels as latents scaled to [-1, 1]; a VAE codec plugs into the same interface.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class IdentityCodec:
  """Pixels as latents: uint8 [0, 255] <-> float32 [-1, 1], f = 1, c = 3."""
  name: str = "identity"
  value_range: float | None = 1.0

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> float32 [..., S, S, 3] in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0

  def decode(self, latents) -> np.ndarray:
    """float [..., S, S, 3] -> uint8 [..., S, S, 3] (values outside [-1, 1] are clipped)."""
    return np.clip(np.round((np.asarray(latents, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def latent_shape(data_config) -> tuple[int, int, int]:
  """(h, w, c) of one image's latent under config.data's codec."""
  size = data_config.image_size
  if data_config.codec == "vae":
    return (size // data_config.latent_downsample, size // data_config.latent_downsample,
            data_config.latent_channels)
  return (size, size, 3)


def make_codec(data_config):
  """The codec named by config.data.codec."""
  if data_config.codec == "identity":
    return IdentityCodec()
  if data_config.codec == "vae":
    raise ValueError("config.data.codec = 'vae': VAE weights cannot be loaded yet; the vae codec only sizes "
                     "models (tfusion.params, tfusion.aot). Train with codec 'identity'.")
  raise ValueError(f"config.data.codec = {data_config.codec!r}: unknown codec (available: identity, vae)")
