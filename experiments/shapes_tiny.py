r"""The embedded default in pixel space: a small Transfusion on procedurally generated coloured shapes
+ pydoc text (the quick path; the README demo trains on VAE latents, experiments/shapes_latent.py).

  python -m tfusion.train --config experiments/shapes_tiny.py --workdir /tmp/tfusion_shapes
  python -m tfusion.train --config experiments/shapes_tiny.py:64 --workdir /tmp/tfusion_shapes64

Pixel space (identity codec), 32x32 images by default (`:N` for N x N images), 8 x 8 patches per
image. Finishes in minutes on 2 CPU cores.
"""
from tfusion.config import default_config


def get_config(arg=None):
  """arg: optional image size in pixels (default 32); patches grow with it (8 x 8 per image). The other
  shapes recipes (shapes_latent.py, ablations.py) start from this one."""
  image_size = int(arg) if arg else 32
  c = default_config()
  c.data.image_size = image_size
  c.total_steps = 1000
  c.batch_size = 8
  c.seq_len = 256
  c.log_every = 10
  c.ckpt_every = 250
  c.sample_every = 500
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.mlp_dim = 384
  c.model.patch_size = image_size // 8
  c.data.vocab_size = 512
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.sample.diffusion_steps = 250
  c.ema_decay = 0.999            # a 1000-step run: the average spans the last ~1000 updates
  return c
