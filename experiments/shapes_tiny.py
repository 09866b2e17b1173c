r"""The embedded default in pixel space: a small Transfusion on procedurally generated coloured shapes
+ pydoc text (the quick path; the README demo trains on VAE latents, experiments/shapes_latent.py).

  python -m tfusion.train --config experiments/shapes_tiny.py --workdir /tmp/tfusion_shapes
  python -m tfusion.train --config experiments/shapes_tiny.py:64 --workdir /tmp/tfusion_shapes64

Pixel space (identity codec), 32x32 images by default (`:N` for N x N images), 8 x 8 patches per
image. Finishes in minutes on 2 CPU cores.
"""
from tfusion.config import shapes_demo_config


def get_config(arg=None):
  """arg: optional image size in pixels (default 32); patches grow with it (8 x 8 per image)."""
  return shapes_demo_config(int(arg) if arg else 32)
