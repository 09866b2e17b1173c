"""The run spec: an experiment config resolved once into the values the libraries take.

  spec = spec_lib.resolve(config)         # config.validate, then the constructor checks below
  model = spec.transfusion(tokenizer.vocab_size)
  spec.layout: data.sequence.RowLayout    spec.alpha_bar: [T + 1]    spec.sampling: SamplingOptions

The model's vocabulary is the run's tokenizer's (known once the tokenizer is; until then
config.data.vocab_size), followed with the vq codec by data.codebook_size image codes; everything else is
fixed by the config. The constructors check how the image,
latent, patch and row sizes fit together and name the config field at fault.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from tfusion import config as config_lib, diffusion
from tfusion.data import sequence
from tfusion.inference import decoding
from tfusion.models import transformer, transfusion


def latent_shape(data) -> tuple[int, int, int]:
  """(h, w, c) of one image's latent under config.data's codec (vq: its code grid, c = 1)."""
  size = data.image_size
  if data.codec == "identity":
    return (size, size, 3)
  if size % data.latent_downsample:
    raise config_lib.field_error("data.latent_downsample", data.latent_downsample,
                                 f"must divide data.image_size = {size}")
  channels = 1 if data.codec == "vq" else data.latent_channels
  return (size // data.latent_downsample, size // data.latent_downsample, channels)


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
  """model: the Transfusion config (vocab_size from the config until transfusion() is given the tokenizer's);
  layout: the rows of every batch; alpha_bar [T + 1] float64: the noise schedule; sampling: how samples and
  evaluations draw (config.sample); image_size: pixels per side."""
  model: transfusion.TransfusionConfig
  layout: sequence.RowLayout
  alpha_bar: np.ndarray
  sampling: decoding.SamplingOptions
  image_size: int

  def __post_init__(self):
    m, size = self.model, self.model.latent_shape[0]
    if size % m.patch_size:
      raise config_lib.field_error("model.patch_size", m.patch_size, f"must divide the latent size {size}")
    if m.patch_encoder == "unet":
      if m.patch_size & (m.patch_size - 1):
        raise config_lib.field_error("model.patch_size", m.patch_size,
                                     "must be a power of 2 with the unet patch encoder")
      levels = m.patch_size.bit_length()
      if len(m.unet_channels) != levels:
        raise config_lib.field_error("model.unet_channels", m.unet_channels,
                                     f"needs log2(patch_size) + 1 = {levels} widths")
    if self.layout.seq_len < m.patches_per_image + 4:
      raise config_lib.field_error("seq_len", self.layout.seq_len,
                                   f"must hold one image ({m.patches_per_image} patches + BOS, BOI, EOI, EOS)")

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self.model.latent_shape

  @property
  def num_timesteps(self) -> int:
    return len(self.alpha_bar) - 1

  @property
  def discrete_images(self) -> bool:
    """Images are VQ code tokens (the Chameleon baseline), not diffused latents."""
    return self.model.image_codes > 0

  def transfusion(self, vocab_size: int) -> transfusion.Transfusion:
    """The model, with the run tokenizer's vocabulary (and after it the image codes of a vq codec)."""
    return transfusion.Transfusion(dataclasses.replace(self.model, vocab_size=vocab_size + self.model.image_codes))


def resolve(config) -> RunSpec:
  """The spec of a Transfusion experiment config; ConfigError names the first field at fault."""
  config_lib.validate(config)
  m = config.model
  model = transfusion.TransfusionConfig(
      transformer=transformer.TransformerConfig(
          num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
          rope_theta=m.rope_theta, norm_eps=m.norm_eps, dtype=jnp.dtype(m.dtype),
          param_dtype=jnp.dtype(m.param_dtype), remat_policy=m.remat_policy, attention=m.attention,
          attention_chunk=m.attention_chunk, image_attention=m.image_attention, qk_norm=m.qk_norm,
          norm_placement=m.norm_placement),
      vocab_size=config.data.vocab_size, latent_shape=latent_shape(config.data), patch_size=m.patch_size,
      patch_encoder=m.patch_encoder, unet_channels=tuple(m.unet_channels), unet_res_blocks=m.unet_res_blocks,
      unet_skip_empty_slots=m.unet_skip_empty_slots,
      prediction=config.diffusion.prediction, decoder_input=m.decoder_input, decoder_head=m.decoder_head,
      decoder_skip=m.decoder_skip, image_codes=config.data.codebook_size if config.data.codec == "vq" else 0)
  s = config.sample
  return RunSpec(
      model=model, layout=sequence.RowLayout(config.seq_len, model.latent_shape, m.patch_size,
                                                config.data.max_images_per_row, model.image_codes > 0),
      alpha_bar=diffusion.make_alpha_bar(config.diffusion.schedule, config.diffusion.num_timesteps),
      sampling=decoding.SamplingOptions(diffusion_steps=s.diffusion_steps, sampler=s.sampler, cfg_scale=s.cfg_scale,
                                        max_new_tokens=s.max_caption_tokens, image_temperature=s.image_temperature,
                                        image_top_k=s.image_top_k),
      image_size=config.data.image_size)
