"""The run spec: resolved once from a config, with the geometry checks of its constructors."""
import numpy as np
import pytest

from tfusion import config as config_lib, diffusion, spec as spec_lib


def test_the_spec_holds_what_the_libraries_take():
  config = config_lib.default_config()
  config.sample.cfg_scale, config.sample.max_caption_tokens = 2.0, 12
  spec = spec_lib.resolve(config)
  assert spec.layout.latent_shape == spec.latent_shape == (32, 32, 3) and spec.layout.seq_len == config.seq_len
  assert spec.layout.patches_per_image == 256 and spec.image_size == 32
  np.testing.assert_array_equal(spec.alpha_bar, diffusion.make_alpha_bar("cosine", 1000))
  assert spec.num_timesteps == 1000
  assert (spec.sampling.cfg_scale, spec.sampling.max_new_tokens, spec.sampling.diffusion_steps) == (2.0, 12, 250)
  assert spec.transfusion(77).cfg.vocab_size == 77 and spec.model.vocab_size == config.data.vocab_size


def test_vae_latents_are_image_size_over_the_downsampling_factor():
  config = config_lib.default_config()
  config.data.codec, config.data.image_size, config.data.latent_channels, config.data.latent_downsample = (
      "vae", 64, 4, 8)
  assert spec_lib.resolve(config).latent_shape == (8, 8, 4)
  config.data.latent_downsample = 6
  with pytest.raises(config_lib.ConfigError, match="config.data.latent_downsample = 6: must divide data.image_size"):
    spec_lib.resolve(config)


@pytest.mark.parametrize("fields, message", [
    (dict(patch_size=5), "config.model.patch_size = 5: must divide the latent size 32"),
    (dict(patch_encoder="unet", patch_size=4, unet_channels=(8,)), "config.model.unet_channels = (8,): needs"),
])
def test_geometry_errors_name_the_field(fields, message):
  config = config_lib.default_config()
  config.model.update(fields)
  with pytest.raises(config_lib.ConfigError) as error:
    spec_lib.resolve(config)
  assert message in str(error.value)
