"""End to end: a tiny Transfusion memorises a few captioned images and draws each back from its caption.

The training rows and the sampler are the library's (sequence.RowBuilder, the jitted train step, sampler_lib.Sampler),
so a regression anywhere on the image path (noising, patching, the mask, the decoder's parameterisation, the
DDPM/DDIM chains, CFG rows, the EMA) shows up as a blurred or wrong image.
"""
import os

import jax
import numpy as np
import pytest

from tfusion import codecs, config as config_lib, diffusion, sharding, spec as spec_lib
from tfusion.data import sequence, shapes, tokenizer as tokenizer_lib
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.training import optim, state as state_lib, step as step_lib
from tests.helpers import REPO

SCENES = [shapes.Scene((shapes.Group("square", "red", 1),), "none"),
          shapes.Scene((shapes.Group("circle", "blue", 1),), "none"),
          shapes.Scene((shapes.Group("triangle", "green", 1),), "none"),
          shapes.Scene((shapes.Group("circle", "yellow", 2),), "none")]
STEPS = 400


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, S, S, 3]."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(255.0 ** 2 / mse)


def memorising_config(**diffusion_options):
  c = config_lib.load_experiment(os.path.join(REPO, "experiments", "shapes_tiny.py:16"))   # pixel space
  c.model.patch_size = 4                         # 4x4x3 patches: 16 elements per image
  c.total_steps, c.batch_size, c.seq_len = STEPS, 8, 80
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 3, 128, 4, 384
  c.optim.lr, c.optim.warmup_steps = 2e-3, 20
  c.ema_decay = 0.99
  c.diffusion.update(diffusion_options)
  spec_lib.resolve(c)
  return c


def train(config):
  """Trains on rows of [BOS caption image EOS] documents of the SCENES (10% with the caption dropped, for CFG);
  returns (sampler of the EMA params, images, captions)."""
  rng = np.random.default_rng(0)
  images = np.stack([shapes.render_scene(s, config.data.image_size, rng) for s in SCENES])
  captions = [shapes.caption_for(s) for s in SCENES]
  tok = tokenizer_lib.train_tokenizer(captions * 10, 280)
  special = sequence.SpecialIds.of(tok)
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(tok.vocab_size), spec.layout
  latents = codecs.IdentityCodec().encode(images)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  state, shardings = state_lib.create_train_state(model, tx, sequence.dummy_batch(1, layout), jax.random.key(0),
                                                  mesh, ema=True)
  step = step_lib.jit_train_step(
      mesh, shardings, model=model, tx=tx, schedule=schedule,
      alpha_bar=diffusion.make_alpha_bar("cosine", 1000), loss_weight=config.diffusion.loss_weight,
      min_snr_gamma=config.diffusion.min_snr_gamma, ema_decay=config.ema_decay, train_key=jax.random.key(1))
  for s in range(config.total_steps):
    draw = np.random.default_rng(s)
    rows = []
    for _ in range(config.batch_size):
      row = sequence.RowBuilder(layout, special, 1000)
      for i in draw.integers(len(SCENES), size=2):
        caption = tok.encode(captions[i]) if draw.random() > 0.1 else []
        row.add(sequence.image_caption_document(caption, latents[i], True, special, 1000, 500))
      rows.append(row.arrays())
    with jax.set_mesh(mesh):
      state, _ = step(state, {k: np.stack([r[k] for r in rows]) for k in rows[0]})
  return sampler_lib.Sampler(config, state.ema_params, tok, mesh), images, captions


@pytest.fixture(scope="module")
def memorised():
  return train(memorising_config(prediction="v"))


@pytest.mark.parametrize("options", [decoding.SamplingOptions(diffusion_steps=100),
                                     decoding.SamplingOptions(diffusion_steps=50, sampler="ddim"),
                                     decoding.SamplingOptions(diffusion_steps=100, cfg_scale=3.0)],
                         ids=["ddpm100", "ddim50", "ddpm100_cfg3"])
def test_each_image_is_drawn_back_from_its_caption(memorised, options):
  sampler, images, captions = memorised
  drawn = sampler.text_to_image(captions, options, jax.random.key(2))
  quality = psnr(drawn, images)
  assert quality.min() > 24, quality
  # Each caption draws its own image: every drawing is much closer to its own image than to any other.
  for i, image in enumerate(drawn):
    others = [psnr(image[None], images[j][None])[0] for j in range(len(images)) if j != i]
    assert quality[i] > max(others) + 6, (i, quality[i], others)
