r"""A small KL-VAE for the embedded shapes data (the first stage of the README demo).

  python -m tfusion.train_vae --config experiments/vae_shapes.py --workdir workdir/demo/vae

32x32 images -> 8x8x8 latents (f = 4), the paper's 8 channels. The paper's loss weights (L1 + LPIPS
+ 0.5 GAN + 1e-6 KL) are kept; LPIPS is off unless config.loss.lpips_params names a weights file, and
the GAN starts at config.loss.gan_start_step (the paper's 50k is past this short run's end).
"""
from tfusion.config import default_vae_config


def get_config():
  c = default_vae_config()
  c.total_steps = 1600           # the shapes checker reads its reconstructions at 100% from about here
  c.batch_size = 16
  c.log_every = 20
  c.ckpt_every = 200
  c.sample_every = 200
  c.model.block_out_channels = (16, 32, 32)
  c.model.layers_per_block = 1
  c.model.latent_channels = 8
  c.model.norm_num_groups = 8
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.data.image_size = 32
  return c
