r"""The shapes demo in latent space: Transfusion on 8x8x8 latents of the shapes VAE (README demo).

  python -m tfusion.train_vae --config experiments/vae_shapes.py --workdir workdir/demo/vae
  python -m tfusion.encode_latents --config experiments/shapes_latent.py
  python -m tfusion.train --config experiments/shapes_latent.py --workdir workdir/demo/transfusion

config.data.vae and config.data.latent_cache default to workdir/demo/{vae,latents}; `:ROOT` moves both
under another directory. 2x2 latent patches (the paper's choice): 16 elements per image, encoded and decoded
by U-Net blocks (the paper's encoder of choice; at this size it is what makes the shapes sharp and their
counts right, docs/results.md "Image generation"). 1000 steps, evaluated at the end (eval/step_1000.json).
"""
import os

from tfusion.config import load_experiment


def get_config(arg=None):
  """arg: the directory holding vae/ and latents/ (default workdir/demo)."""
  c = load_experiment(os.path.join(os.path.dirname(__file__), "shapes_tiny.py"))
  root = arg or os.path.join("workdir", "demo")
  c.data.codec = "vae"
  c.data.vae = os.path.join(root, "vae")
  c.data.latent_cache = os.path.join(root, "latents")
  c.data.latent_channels = 8
  c.data.latent_downsample = 4
  c.model.patch_size = 2
  c.model.patch_encoder = "unet"
  c.model.unet_channels = (64, 128)
  c.model.unet_res_blocks = 1
  c.data.max_images_per_row = 6  # 256-element rows hold 14 images of 16 patches but carry ~5 in the 1:1 mix;
  #                                the U-Net runs on every slot, so 6 slots cut the step time by 40%
  c.total_steps = 1000
  c.eval_every = 1000
  return c
