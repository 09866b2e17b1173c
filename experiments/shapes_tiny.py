r"""The embedded default: a small Transfusion on procedurally generated coloured shapes + pydoc text.

  python -m tfusion.train --config experiments/shapes_tiny.py --workdir /tmp/tfusion_shapes
  python -m tfusion.train --config experiments/shapes_tiny.py:64 --workdir /tmp/tfusion_shapes64

Pixel space (identity codec), 32x32 images by default (`:N` for N x N images). Finishes in
minutes on 2 CPU cores.
"""
from tfusion.config import default_config


def get_config(arg=None):
  """arg: optional image size in pixels (default 32); patches grow with it (8 x 8 per image)."""
  c = default_config()
  c.data.image_size = int(arg) if arg else 32
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
  c.model.patch_size = c.data.image_size // 8
  c.data.vocab_size = 512
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.sample.diffusion_steps = 250
  return c
