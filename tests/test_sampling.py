"""Sampling used by the training loop: shapes, determinism, caption conditioning, EOS handling."""
import jax
import numpy as np

from tfusion import diffusion, sampling
from tfusion.data import sequence
from tests.helpers import SPECIAL
from tests.test_model import LATENT, VOCAB, make_model, tiny_config

AB = diffusion.cosine_alpha_bar(1000)


def model_and_params():
  model = make_model(tiny_config())
  rows = np.zeros((1, 24), np.int32)
  params = model.init(jax.random.key(0), rows, rows, rows, rows, np.zeros((1, 1, *LATENT), np.float32),
                      np.zeros((1, 1), np.int32))["params"]
  params["patch_decoder"]["proj"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(1), (32, 12))
  return model, params


def test_generate_images_shapes_range_determinism_and_conditioning():
  model, params = model_and_params()
  captions = [[10, 11, 12], [10, 11, 12], [40, 41]]
  images = sampling.generate_images(model, params, captions, SPECIAL, AB, 3, jax.random.key(5), clip_x0=1.0)
  assert images.shape == (3, *LATENT) and images.dtype == np.float32
  assert np.isfinite(images).all() and np.abs(images).max() <= 1.0 + 1e-6
  again = sampling.generate_images(model, params, captions, SPECIAL, AB, 3, jax.random.key(5), clip_x0=1.0)
  np.testing.assert_array_equal(images, again)
  # Rows 0 and 1 share a caption but not their noise; row 2's caption differs.
  assert np.abs(images[0] - images[1]).max() > 1e-3
  single = sampling.generate_images(model, params, captions[:1], SPECIAL, AB, 3, jax.random.key(5), clip_x0=1.0)
  assert single.shape == (1, *LATENT)


def test_generate_captions_greedy_and_cut_at_eos():
  model, params = model_and_params()
  latents = np.random.default_rng(0).uniform(-1, 1, (2, *LATENT)).astype(np.float32)
  captions = sampling.generate_captions(model, params, latents, SPECIAL, max_tokens=6)
  assert len(captions) == 2
  for c in captions:
    assert len(c) <= 6 and all(0 <= t < VOCAB for t in c) and SPECIAL.eos not in c
  assert sampling.generate_captions(model, params, latents, SPECIAL, max_tokens=6) == captions
  # A zero final norm makes all logits 0, so greedy picks id 0; with EOS = 0 every caption is empty.
  silent = dict(params, transformer=dict(params["transformer"], final_norm={"scale": np.zeros(32, np.float32)}))
  eos_is_zero = sequence.SpecialIds(pad=1, bos=2, eos=0, boi=4, eoi=5)
  assert sampling.generate_captions(model, silent, latents, eos_is_zero, max_tokens=6) == [[], []]
  assert sampling.generate_captions(model, silent, latents, SPECIAL, max_tokens=6) == [[0] * 6] * 2
