r"""A small VQ-VAE for the embedded shapes data: the Chameleon baseline's image tokenizer at demo scale.

  python -m tfusion.train_vae --config experiments/vqvae_shapes.py --workdir workdir/demo/vqvae

The architecture of experiments/vae_shapes.py (32x32 images, f = 4: 8x8 = 64 codes per image) with
model.bottleneck = "vq": the encoder's 8 channels projected to 8-dim codes (the paper's vq_dim) in a codebook
of 256 (the paper's 16,384 is far more than 20,000 small images need). The paper's loss weights (L1 + LPIPS
+ 0.5 GAN + L_codebook, beta = 0.25) are kept; LPIPS is off unless config.loss.lpips_params names a weights
file, and the GAN starts at config.loss.gan_start_step (past this run's end).
"""
from tfusion.config import default_vae_config


def get_config():
  c = default_vae_config()
  c.total_steps = 1600
  c.batch_size = 16
  c.log_every = 20
  c.ckpt_every = 200
  c.sample_every = 200
  c.model.block_out_channels = (16, 32, 32)
  c.model.layers_per_block = 1
  c.model.latent_channels = 8
  c.model.norm_num_groups = 8
  c.model.bottleneck = "vq"
  c.model.vq_dim = 8
  c.model.codebook_size = 256
  c.model.codebook_restart_steps = 50   # a batch holds 1024 code positions: an unused code is a dead one
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.data.image_size = 32
  return c
