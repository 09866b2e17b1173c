r"""The paper's ablations at toy scale on the shapes demo's latents: python -m tfusion.ablate
--config experiments/ablations.py:<name>[,ROOT] --workdir DIR (ROOT holds the demo's vae/ and latents/,
default workdir/demo: run launch/demo.sh first).

  mask         bidirectional vs causal attention inside each image, linear encoder (paper Table 5)
  lambda       diffusion loss weight 1 vs 5 (the paper uses 5 and gives no table)
  noise_limit  image-first pairs noised up to t = 500 vs 1000 (paper Table 8, captioning)
  patch        2x2 vs 4x4 latent patches, linear encoder (paper Table 6)

Three seeds each (--config.seeds to change), 1000 steps of the demo's model with the linear patch encoder
(v-prediction, EMA 0.999), evaluation on 64 held-out images at the end. One variant of each is the same
config, the paper's settings (bidirectional, lambda_5, capped_500, patch_2): with one --workdir per
ablation, its cells can be trained once and linked into the others.
"""
import os

import ml_collections

from tfusion.config import load_experiment

ABLATIONS = {
    "mask": {"bidirectional": {"model": {"image_attention": "bidirectional"}},
             "causal": {"model": {"image_attention": "causal"}}},
    "lambda": {"lambda_1": {"diffusion": {"loss_weight": 1.0}}, "lambda_5": {"diffusion": {"loss_weight": 5.0}}},
    "noise_limit": {"capped_500": {"diffusion": {"image_first_max_t": 500}},
                    "uncapped": {"diffusion": {"image_first_max_t": 1000}}},
    "patch": {"patch_2": {"model": {"patch_size": 2}}, "patch_4": {"model": {"patch_size": 4}}},
}


def get_config(arg="lambda"):
  name, _, root = arg.partition(",")
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}: one of {sorted(ABLATIONS)}")
  base = load_experiment(os.path.join(os.path.dirname(__file__), "shapes_tiny.py"))
  root = root or "workdir/demo"
  base.data.codec, base.data.vae, base.data.latent_cache = "vae", f"{root}/vae", f"{root}/latents"
  base.data.latent_channels, base.data.latent_downsample = 8, 4
  base.model.patch_size, base.model.patch_encoder = 2, "linear"
  base.total_steps, base.sample_every, base.eval_examples = 1000, 1000, 64
  c = ml_collections.ConfigDict()
  c.base = base
  c.variants = ml_collections.ConfigDict(ABLATIONS[name])
  c.seeds = (0, 1, 2)
  return c
