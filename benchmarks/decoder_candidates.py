r"""What the patch decoder should predict: each candidate memorises four captioned 32x32 images and draws
them back from their captions (docs/results.md, "Image generation").

  python benchmarks/decoder_candidates.py [--variants paper,v,...] [--steps 600] [--out FILE]

The shapes demo's pixel-space model (d 128, 4 layers, 8x8 patches) trains on rows packed with the four
caption-first pairs (10% of captions dropped for CFG). Reported per variant: the eps MSE of the four images
at fixed t and noise (from EMA weights when the variant keeps them), the same for the two reference denoisers
of the four images (evaluation.suite.reference_eps: the mean image, and the ideal denoiser), and the PSNR of
the drawn images against the true ones with DDPM 250, DDIM 50 and DDPM 250 + CFG 3. Prints a table and writes benchmarks/results/decoder_candidates.json
and one PNG grid per variant and sampler beside it.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfusion import codecs, config as config_lib, diffusion, objective, sharding, spec as spec_lib, visualize
from tfusion.data import sequence, shapes, tokenizer as tokenizer_lib
from tfusion.evaluation import suite
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.training import optim, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "paper": {"diffusion.prediction": "eps"},
    "pre_norm": {"diffusion.prediction": "eps", "model.decoder_input": "pre_norm"},
    "skip": {"diffusion.prediction": "eps", "model.decoder_skip": True},
    "adaln_zero": {"diffusion.prediction": "eps", "model.decoder_head": "adaln_zero"},
    "min_snr_5": {"diffusion.prediction": "eps", "diffusion.min_snr_gamma": 5.0},
    "v": {"diffusion.prediction": "v"},
    "v_ema": {"diffusion.prediction": "v", "ema_decay": 0.999},
    "v_min_snr_5": {"diffusion.prediction": "v", "diffusion.min_snr_gamma": 5.0},
    "v_pre_norm": {"diffusion.prediction": "v", "model.decoder_input": "pre_norm"},
}
TIMESTEPS = (10, 100, 300, 500, 700, 900, 990)
SAMPLERS = {"ddpm250": decoding.SamplingOptions(diffusion_steps=250),
            "ddim50": decoding.SamplingOptions(diffusion_steps=50, sampler="ddim"),
            "ddpm250_cfg3": decoding.SamplingOptions(diffusion_steps=250, cfg_scale=3.0)}
SCENES = [shapes.Scene((shapes.Group("square", "red", 1),), "none"),
          shapes.Scene((shapes.Group("circle", "blue", 1),), "none"),
          shapes.Scene((shapes.Group("triangle", "green", 1),), "none"),
          shapes.Scene((shapes.Group("circle", "yellow", 2),), "none")]


def variant_config(overrides: dict, steps: int):
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", "shapes_tiny.py"))
  config.seq_len, config.total_steps, config.optim.warmup_steps, config.ema_decay = 160, steps, 50, 0.0
  config.update_from_flattened_dict(overrides)
  config_lib.validate(config)
  return config


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """Mean over images of the PSNR of uint8 images x, y: [N, H, W, C]."""
  mse = np.mean(np.square(x.astype(np.float64) - y), axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0**2 / mse)))


def run_variant(name: str, overrides: dict, steps: int, out_dir: str) -> dict:
  config = variant_config(overrides, steps)
  rng = np.random.default_rng(0)
  images = np.stack([shapes.render_scene(s, 32, rng) for s in SCENES])
  captions = [shapes.caption_for(s) for s in SCENES]
  tokenizer = tokenizer_lib.train_tokenizer(captions * 20 + ["the quick brown fox"] * 5, 300)
  special = sequence.SpecialIds.of(tokenizer)
  spec = spec_lib.resolve(config)
  model, layout = spec.transfusion(tokenizer.vocab_size), spec.layout
  codec = codecs.IdentityCodec()
  latents = codec.encode(images)
  alpha_bar = diffusion.make_alpha_bar(config.diffusion.schedule, 1000)

  def batch_at(step):
    draw = np.random.default_rng(step)
    rows = []
    for _ in range(config.batch_size):
      row = sequence.RowBuilder(layout, special, 1000)
      while True:
        i = draw.integers(4)
        caption = tokenizer.encode(captions[i]) if draw.random() > 0.1 else []
        document = sequence.image_caption_document(caption, latents[i], True, special, 1000, 500)
        if not row.fits(document):
          break
        row.add(document)
      rows.append(row.arrays())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state, shardings = state_lib.create_train_state(model, tx, sequence.dummy_batch(1, layout), init_key, mesh,
                                                  ema=config.ema_decay > 0)
  train_step = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule, alpha_bar=alpha_bar,
                                       loss_weight=config.diffusion.loss_weight,
                                       min_snr_gamma=config.diffusion.min_snr_gamma,
                                       z_loss_weight=config.z_loss_weight, ema_decay=config.ema_decay,
                                       train_key=train_key)
  start = time.time()
  for step in range(steps):
    with jax.set_mesh(mesh):
      state, _ = train_step(state, jax.device_put(batch_at(step), sharding.batch_sharding(mesh)))
  result = {"variant": name, "overrides": overrides, "steps": steps, "train_seconds": round(time.time() - start, 1)}

  # eps MSE per t of the four caption-first images, one row, fixed noise.
  params = state.sampling_params
  row = sequence.RowBuilder(sequence.RowLayout(4 * 80, layout.latent_shape, config.model.patch_size), special, 1000)
  for i in range(4):
    row.add(sequence.image_caption_document(tokenizer.encode(captions[i]), latents[i], True, special, 1000, 1000))
  batch = {k: v[None] for k, v in row.arrays().items()}
  eps = jax.random.normal(jax.random.key(7), batch["latents"].shape)
  forward = jax.jit(lambda p, t: objective.forward(p, batch, t, eps, model=model,
                                                  alpha_bar=jnp.asarray(alpha_bar, jnp.float32)))
  valid = batch["image_valid"][0]
  for t in TIMESTEPS:
    _, output, x_t = forward(params, jnp.full(batch["t_max"].shape, t))
    eps_hat = diffusion.eps_from_prediction(model.cfg.prediction, output, x_t, alpha_bar[t])
    mean_eps, ideal_eps = suite.reference_eps(x_t[0][valid], alpha_bar[t], latents)
    for key, estimate in (("eps_mse", eps_hat[0][valid]), ("mean_image_eps_mse", mean_eps),
                          ("ideal_eps_mse", ideal_eps)):
      result[f"{key}_t{t}"] = float(jnp.mean(jnp.square(estimate - eps[0][valid])))

  sampler = sampler_lib.Sampler(config, params, tokenizer, mesh, codec)
  for label, options in SAMPLERS.items():
    drawn = sampler.text_to_image(captions, options, jax.random.key(1))
    result[f"psnr_{label}"] = psnr(drawn, images)
    visualize.save_image_grid(os.path.join(out_dir, f"{name}_{label}.png"), np.concatenate([images, drawn]),
                              captions + captions)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "decoder_candidates.json"))
  args = parser.parse_args()
  out_dir = os.path.join(os.path.dirname(args.out), "decoder_candidates")
  os.makedirs(out_dir, exist_ok=True)
  results = []
  print(f"{'variant':<12}" + "".join(f"{'t=' + str(t):>9}" for t in TIMESTEPS) + "  PSNR ddpm250 / ddim50 / cfg3")
  for name in args.variants.split(","):
    r = run_variant(name, VARIANTS[name], args.steps, out_dir)
    results.append(r)
    print(f"{name:<12}" + "".join(f"{r[f'eps_mse_t{t}']:>9.4f}" for t in TIMESTEPS)
          + f"  {r['psnr_ddpm250']:.1f} / {r['psnr_ddim50']:.1f} / {r['psnr_ddpm250_cfg3']:.1f}", flush=True)
  print(f"{'mean image':<12}" + "".join(f"{results[0][f'mean_image_eps_mse_t{t}']:>9.4f}" for t in TIMESTEPS))
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
