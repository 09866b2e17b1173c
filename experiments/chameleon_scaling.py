r"""Transfusion against the Chameleon baseline at equal 6ND FLOPs, the paper's Table 3 at toy scale:
python -m tfusion.ablate --config experiments/chameleon_scaling.py[:ROOT] --workdir DIR.

ROOT (default workdir/demo) holds the shapes VAE and its latents (launch/demo.sh: vae/, latents/) and the VQ-VAE and
its codes (experiments/chameleon_shapes.py: vqvae/, codes/). Three model sizes x two token budgets per method:

  transfusion_<size>_<steps>  experiments/ablations.py's Transfusion: linear 2x2 patches of 8x8x8 latents, 16
                              elements per image, lambda 5 (the paper's controlled comparison, §4.2)
  chameleon_<size>_<steps>    experiments/chameleon_shapes.py: 64 VQ code tokens per image, LM loss only

Every cell trains on the same rows per step (8 x 256 elements, half of them text), so a cell's D is its steps x
2048 elements and its FLOPs 6ND as the paper counts them. --collect adds table3.md, scaling.json and scaling.png
(tfusion.evaluation.scaling_laws): per metric the log-log trendline of each method and the parity FLOP ratio, the
FLOPs Transfusion needs to match the largest Chameleon run over that run's FLOPs.
"""
import os

import ml_collections

from tfusion.config import load_experiment

SIZES = {"s": (2, 64), "m": (3, 96), "l": (4, 128)}   # name -> (layers, d_model); 4 heads, SwiGLU width 3 d
STEPS = (300, 600)


def _flat(config, prefix=""):
  """{dotted field: value} of a ConfigDict."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _nested(flat: dict) -> dict:
  out = {}
  for dotted, value in flat.items():
    *groups, name = dotted.split(".")
    node = out
    for group in groups:
      node = node.setdefault(group, {})
    node[name] = value
  return out


def get_config(arg=None):
  root = arg or os.path.join("workdir", "demo")
  here = os.path.dirname(__file__)
  base = load_experiment(os.path.join(here, f"ablations.py:lambda,{root}")).base
  base.eval_examples = 64
  chameleon = load_experiment(os.path.join(here, f"chameleon_shapes.py:{root}"))
  base_fields = _flat(base)
  to_chameleon = {k: v for k, v in _flat(chameleon).items() if k in base_fields and v != base_fields[k]
                  and k not in ("total_steps", "eval_every", "sample_every")}
  variants, methods = {}, {}
  for method, overrides in (("transfusion", {}), ("chameleon", to_chameleon)):
    for size, (layers, width) in SIZES.items():
      for steps in STEPS:
        name = f"{method}_{size}_{steps}"
        variants[name] = _nested({**overrides, "model.num_layers": layers, "model.d_model": width,
                                  "model.mlp_dim": 3 * width, "total_steps": steps})
        methods[name] = method
  c = ml_collections.ConfigDict()
  c.base = base
  c.variants = ml_collections.ConfigDict(variants)
  c.methods = ml_collections.ConfigDict(methods)
  c.seeds = (0,)
  return c
