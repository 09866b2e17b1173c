r"""Sampling speed with and without the KV cache: image generation after prefixes of 64, 512 and 2048
tokens, and text tokens per second.

  python benchmarks/sampling.py [--size 160m|demo] [--prefixes 64,512,2048] [--steps 2,6]
      [--text_tokens 16] [--rows 1] [--cfg_scale 1] [--out FILE]

Random weights (speed does not depend on training). The image is the paper's: 32x32x8 latents in 2x2
patches, 256 elements (--size demo: the shapes demo model and its 64-patch images). "uncached" reruns
the model over the whole sequence at every diffusion step and token (tfusion.inference.decoding.FullMemory);
"cached" computes only the new block against the KV cache. Each is timed at a few step counts (after a
compiling warm-up) and a line fitted: fixed cost (prefill, start-up) + per-step cost, which gives the
time of a 250-step image. At prefix P and n patches a step's FLOPs differ by at most (P + n + 2) / n
(the flop_bound column of the JSON). With --cfg_scale w != 1 the images are guided (each row with its
unconditional partner), and the text is timed in the text phases of a guided interleaved decode (the
INTERLEAVED task with max_images = 0: the partners exist, no image is drawn). Prints a table and writes
benchmarks/results/sampling.json.
"""
import argparse
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np

from tfusion import config as config_lib, diffusion, spec as spec_lib
from tfusion.data import sequence
from tfusion.inference import decoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = sequence.SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)


def build_model(size: str):
  """(model, random params, latent shape)."""
  if size == "demo":
    config = config_lib.default_config()
    config.update_from_flattened_dict({"model.num_layers": 4, "model.d_model": 128, "model.num_heads": 4,
                                       "model.mlp_dim": 384, "model.patch_size": 4})
    vocab = 512
  else:
    config = config_lib.load_experiment(os.path.join(REPO, "experiments", f"transfusion_paper.py:size={size}"))
    config.model.dtype, config.model.remat_policy, config.model.attention = "float32", "none", "dense"
    vocab = config.data.vocab_size
  spec = spec_lib.resolve(config)
  model, latent_shape = spec.transfusion(vocab), spec.latent_shape
  rows = np.zeros((1, 8), np.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), rows, rows, rows, rows,
                                              np.zeros((1, 1, *latent_shape), np.float32), np.zeros((1, 1), np.int32)))
  params = params["params"]
  # The zero-initialised patch decoder would make every eps 0; any weights do for timing.
  params["patch_decoder"] = jax.tree.map(lambda p: p + 0.01, params["patch_decoder"])
  return model, params


def timed(fn, repeats=2):
  """Best wall time of fn() after one warm-up call (which compiles)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="160m", help="a paper size (160m, 370m, ...) or demo")
  parser.add_argument("--prefixes", default="64,512,2048")
  parser.add_argument("--steps", default="2,6", help="diffusion step counts timed (a line is fitted)")
  parser.add_argument("--text_tokens", type=int, default=16)
  parser.add_argument("--text_prefix", type=int, default=512)
  parser.add_argument("--rows", type=int, default=1)
  parser.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "sampling.json"))
  args = parser.parse_args()

  model, params = build_model(args.size)
  vocab = model.cfg.vocab_size
  alpha_bar = diffusion.cosine_alpha_bar(1000)
  rng = np.random.default_rng(0)

  def prompt(prefix: int, boi: bool):
    """BOS + random text: `prefix` elements before the first generated one."""
    ids = [SPECIAL.bos, *rng.integers(6, vocab, prefix - 1 - boi)] + ([SPECIAL.boi] if boi else [])
    return [sequence.TextPiece(np.array(ids, np.int32))]

  results = {"size": args.size, "patches_per_image": model.cfg.patches_per_image, "rows": args.rows,
             "cfg_scale": args.cfg_scale, "device": jax.devices()[0].device_kind, "image": [], "text": {}}
  print(f"{args.size}: {model.cfg.patches_per_image} patches per image, {args.rows} row(s), CFG scale "
        f"{args.cfg_scale}, {jax.devices()[0].device_kind}; times of {args.steps} diffusion steps fitted to fixed + "
        "per-step cost")
  print(f"{'prefix':>7} {'uncached s/step':>16} {'cached s/step':>14} {'uncached 250-step s':>20} "
        f"{'cached 250-step s':>18} {'speedup':>8}")
  step_counts = [int(k) for k in args.steps.split(",")]
  for prefix in (int(p) for p in args.prefixes.split(",")):
    prompts = [prompt(prefix, boi=True) for _ in range(args.rows)]
    row = {"prefix": prefix}
    for cached in (False, True):
      seconds = [timed(lambda: decoding.decode(
          model, params, prompts, decoding.IMAGE, SPECIAL, alpha_bar,
          decoding.SamplingOptions(diffusion_steps=k, cfg_scale=args.cfg_scale, clip_x0=1.0), jax.random.key(0),
          cached=cached))
          for k in step_counts]
      per_step, fixed = np.polyfit(step_counts, seconds, 1)
      name = "cached" if cached else "uncached"
      row |= {f"{name}_seconds": dict(zip(map(str, step_counts), seconds)), f"{name}_s_per_step": per_step,
              f"{name}_250_step_s": fixed + 250 * per_step}
    row["speedup_250_steps"] = row["uncached_250_step_s"] / row["cached_250_step_s"]
    row["flop_bound"] = (prefix + model.cfg.patches_per_image + 2) / model.cfg.patches_per_image
    results["image"].append(row)
    print(f"{prefix:>7} {row['uncached_s_per_step']:>16.3f} {row['cached_s_per_step']:>14.3f} "
          f"{row['uncached_250_step_s']:>20.1f} {row['cached_250_step_s']:>18.1f} {row['speedup_250_steps']:>7.1f}x")

  text_options = decoding.SamplingOptions(max_new_tokens=args.text_tokens, temperature=1.0, cfg_scale=args.cfg_scale,
                                          max_images=0)
  text_task, text_name = ((decoding.TEXT, "text") if args.cfg_scale == 1 else
                           (decoding.INTERLEAVED, "guided interleaved text"))
  prompts = [prompt(args.text_prefix, boi=False) for _ in range(args.rows)]
  for cached in (False, True):
    generated = []

    def run():
      generated[:] = decoding.decode(model, params, prompts, text_task, SPECIAL, alpha_bar, text_options,
                                     jax.random.key(0), cached=cached)
    seconds = timed(run)
    tokens = sum(len(g.tokens) for g in generated)
    results["text"]["cached" if cached else "uncached"] = {"tokens": tokens, "seconds": seconds,
                                                           "tokens_per_s": tokens / seconds}
  text = results["text"]
  text["speedup"] = text["cached"]["tokens_per_s"] / text["uncached"]["tokens_per_s"]
  print(f"{text_name} after a {args.text_prefix}-token prefix: {text['uncached']['tokens_per_s']:.1f} tokens/s "
        f"uncached, {text['cached']['tokens_per_s']:.1f} cached ({text['speedup']:.1f}x; prefill included)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
