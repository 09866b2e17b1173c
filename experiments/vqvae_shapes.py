r"""A small VQ-VAE for the embedded shapes data: the Chameleon baseline's image tokenizer at demo scale.

  python -m tfusion.train_vae --config experiments/vqvae_shapes.py --workdir workdir/demo/vqvae

The architecture of experiments/vae_shapes.py (32x32 images, f = 4: 8x8 = 64 codes per image) with
model.bottleneck = "vq": the encoder's 8 channels projected to 8-dim codes (the paper's vq_dim) in a codebook
of 256 (the paper's 16,384 is far more than 20,000 small images need). The paper's loss weights (L1 + LPIPS
+ 0.5 GAN + L_codebook, beta = 0.25) are kept; LPIPS is off unless config.loss.lpips_params names a weights
file, and the GAN starts at config.loss.gan_start_step (past this run's end).
"""
import os

from tfusion.config import load_experiment


def get_config():
  c = load_experiment(os.path.join(os.path.dirname(__file__), "vae_shapes.py"))
  c.model.bottleneck = "vq"
  c.model.vq_dim = 8
  c.model.codebook_size = 256
  c.model.codebook_restart_steps = 50   # a batch holds 1024 code positions: an unused code is a dead one
  return c
