r"""The Chameleon baseline on the embedded shapes data: images as VQ-VAE codes through the same transformer, the
LM loss only (paper §4.1 Baseline). The counterpart of experiments/ablations.py's Transfusion (linear 2x2 patches
of the shapes VAE's 8x8x8 latents: 16 elements per image) is 8x8 = 64 code tokens per image, the paper's 4x.

  python -m tfusion.train_vae --config experiments/vqvae_shapes.py --workdir workdir/demo/vqvae
  python -m tfusion.encode_latents --config experiments/chameleon_shapes.py
  python -m tfusion.train --config experiments/chameleon_shapes.py --workdir workdir/demo/chameleon

`:ROOT` (default workdir/demo) holds vqvae/ and codes/. The paper's stability recipe is on: QK-norm, the norm
after each branch, z-loss 1e-4. Its lr of 1e-4 is not: at this scale and length the shapes recipe's lr (2e-3) trains
both methods, and an lr handicap would be measured instead of the image representation (docs/results.md).
Image tokens are sampled at temperature 1 with classifier-free guidance on their logits (sample.cfg_scale).
"""
import os

from tfusion.config import load_experiment


def get_config(arg=None):
  """arg: the directory holding vqvae/ and codes/ (default workdir/demo)."""
  c = load_experiment(os.path.join(os.path.dirname(__file__), "shapes_tiny.py"))
  root = arg or os.path.join("workdir", "demo")
  c.data.codec = "vq"
  c.data.vae = os.path.join(root, "vqvae")
  c.data.latent_cache = os.path.join(root, "codes")
  c.data.codebook_size = 256
  c.data.latent_downsample = 4
  c.model.patch_size = 1
  c.model.qk_norm = True
  c.model.norm_placement = "branch_output"
  c.z_loss_weight = 1e-4
  c.eval_every = c.total_steps
  return c
