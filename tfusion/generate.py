r"""Generate with a trained Transfusion: text -> image, image -> caption, text continuation, interleaved.

  python -m tfusion.generate --workdir RUN --mode image --prompt "a red circle" --out DIR
  python -m tfusion.generate --workdir RUN --mode caption --image a.png --image b.png --out DIR
  python -m tfusion.generate --workdir RUN --mode text --prompt_file prompts.txt --out DIR
  python -m tfusion.generate --workdir RUN --mode interleaved --prompt "..." --max_images 2 --out DIR

A discrete-image run (the Chameleon baseline, data.codec = vq) takes the same commands; its images are VQ code
tokens sampled with --image_temperature / --image_top_k and guided on their logits by --cfg_scale.

--tensor_parallelism K splits each model (heads, MLP units, KV cache) over K devices, whatever the training mesh.

The Python API is tfusion.inference.sampler (`Sampler`, `load(workdir)`); the training loop's periodic
samples use the same calls.
"""
import dataclasses
import json
import os

from absl import app, flags
import jax
import numpy as np
from PIL import Image

from tfusion import diffusion, run_dir, sharding, visualize
from tfusion.data import pipeline, shapes
from tfusion.inference import decoding, sampler as sampler_lib

MODES = ("text", "image", "caption", "interleaved")


def read_images(paths: list[str]) -> np.ndarray:
  """PNG/JPEG files -> uint8 [N, S, S, 3]; the error names the unreadable file."""
  images = []
  for path in paths:
    try:
      with Image.open(path) as im:
        images.append(np.asarray(im.convert("RGB")))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {path}: {e}") from e
  sizes = {im.shape for im in images}
  if len(sizes) > 1:
    raise ValueError(f"images have different sizes {sorted(sizes)}: {paths}")
  return np.stack(images)


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
  lines = list(prompts or [])
  if prompt_file:
    with open(prompt_file) as f:
      lines += [line.rstrip("\n") for line in f if line.strip()]
  return lines


def in_batches(fn, items: list, batch_size: int, key) -> list:
  """fn(batch, key) over items, batch by batch; results per item, in order. When there is more than one
  batch, the last is padded to full size with copies of its last item, so every batch reuses one
  compilation."""
  size = min(batch_size, len(items))
  results = []
  for start in range(0, len(items), size):
    batch = items[start:start + size]
    results += list(fn(sharding.pad_rows(batch, size), jax.random.fold_in(key, start // size)))[:len(batch)]
  return results


def options_from_flags(args) -> decoding.SamplingOptions:
  return decoding.SamplingOptions(
      diffusion_steps=args.diffusion_steps, sampler=args.sampler, ddim_eta=args.ddim_eta, cfg_scale=args.cfg_scale,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
      max_images=args.max_images, image_temperature=args.image_temperature, image_top_k=args.image_top_k)


def run(args) -> dict:
  """Runs one --mode over its inputs in batches, writes the outputs to --out; returns the summary."""
  if args.mode not in MODES:
    raise ValueError(f"--mode={args.mode!r}: one of {MODES}")
  prompts = read_prompts(args.prompt, args.prompt_file)
  if args.mode == "caption":
    if not args.image and not args.test_examples:
      raise ValueError("--mode=caption needs --image path.png (repeatable) or --test_examples N")
  elif not prompts:
    raise ValueError(f"--mode={args.mode} needs --prompt or --prompt_file (use --prompt='' for an unconditional "
                     "image)")
  elif args.mode in ("text", "interleaved") and not all(p.strip() for p in prompts):
    raise ValueError(f"--mode={args.mode}: prompts must not be empty")
  options = options_from_flags(args)
  options.validate(num_timesteps=10**9)   # before the (slow) load; the step count is checked against T later
  mesh = None
  if args.tensor_parallelism:
    mesh = sampler_lib.generation_mesh(run_dir.RunDir(args.workdir).read_config(), args.tensor_parallelism)
  sampler = sampler_lib.load(args.workdir, args.step, mesh, weights=args.weights)
  options.validate(sampler.config.diffusion.num_timesteps)
  key = jax.random.key(args.seed)
  summary = {"workdir": args.workdir, "mode": args.mode, "options": dataclasses.asdict(options), "outputs": []}
  pngs = {}   # file name -> uint8 image

  if args.mode == "image":
    images = np.stack(in_batches(lambda b, k: sampler.text_to_image(b, options, k), prompts, args.batch_size, key))
    for i, (prompt, image) in enumerate(zip(prompts, images)):
      pngs[f"image_{i:03d}.png"] = image
      summary["outputs"].append({"prompt": prompt, "image": f"image_{i:03d}.png"})
    grid = ("grid.png", images, prompts)
  elif args.mode == "caption":
    names = list(args.image or [])
    images = [*read_images(names)] if names else []
    if args.test_examples:
      test = shapes.load_shapes(os.path.expanduser(sampler.config.data.data_dir), "test",
                                sampler.config.data.image_size)
      examples = pipeline.take(test, args.test_examples)
      images += [e["image"] for e in examples]
      names += [f"test[{i}]: {e['caption'].decode()}" for i, e in enumerate(examples)]
    captions = in_batches(lambda b, k: sampler.caption(np.stack(b), options, k), images, args.batch_size, key)
    summary["outputs"] = [{"image": name, "caption": caption} for name, caption in zip(names, captions)]
    grid = ("captioned.png", np.stack(images), captions)
  elif args.mode == "text":
    texts = in_batches(lambda b, k: sampler.continue_text(b, options, k), prompts, args.batch_size, key)
    summary["outputs"] = [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]
    grid = None
  else:
    results = in_batches(lambda b, k: sampler.interleaved(b, options, k), prompts, args.batch_size, key)
    for i, (prompt, parts) in enumerate(zip(prompts, results)):
      entry = {"prompt": prompt, "parts": []}
      for part in parts:
        if isinstance(part, str):
          entry["parts"].append({"text": part})
        else:
          name = f"sample_{i:03d}_image_{len(entry['parts'])}.png"
          pngs[name] = part
          entry["parts"].append({"image": name})
      summary["outputs"].append(entry)
    grid = None

  if jax.process_index() == 0:   # every process decodes (the params span them all); one writes
    os.makedirs(args.out, exist_ok=True)
    for name, image in pngs.items():
      Image.fromarray(image).save(os.path.join(args.out, name))
    if grid:
      visualize.save_image_grid(os.path.join(args.out, grid[0]), grid[1], grid[2])
    with open(os.path.join(args.out, "generations.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.workdir is None or flags.FLAGS.out is None:
    raise app.UsageError("--workdir and --out are required")
  try:
    summary = run(flags.FLAGS)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise app.UsageError(str(e)) from e
  for entry in summary["outputs"]:
    print(json.dumps(entry))
  print(f"wrote {flags.FLAGS.out}/generations.json")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory (config.json, tokenizer.model, checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("weights", "ema", sampler_lib.WEIGHTS, "ema: the params' moving average when the run keeps "
                    "one; raw: the trained params.")
  flags.DEFINE_enum("mode", "image", MODES, "text: continue prompts; image: text to image; caption: image to "
                    "text; interleaved: the model decides when to draw images.")
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
  flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
  flags.DEFINE_multi_string("image", None, "An image to caption (repeatable), at the run's image size.")
  flags.DEFINE_integer("test_examples", 0, "Caption the first N images of the run's test split.")
  flags.DEFINE_string("out", None, "Output directory (PNGs, grid.png / captioned.png, generations.json).")
  flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
  flags.DEFINE_integer("tensor_parallelism", 0, "Decode on a data x tensor mesh of this machine's devices, attention "
                       "heads and MLP units split over groups of this many (large models); 0: the run's mesh, or "
                       "data parallel if it does not fit.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  defaults = decoding.SamplingOptions()
  flags.DEFINE_integer("diffusion_steps", defaults.diffusion_steps, "Denoising steps, respaced from T.")
  flags.DEFINE_enum("sampler", defaults.sampler, diffusion.SAMPLERS, "ddpm (ancestral) or ddim.")
  flags.DEFINE_float("ddim_eta", defaults.ddim_eta, "DDIM eta: 0 deterministic, 1 = DDPM variance.")
  flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance scale w (1 = off; paper ablations: 3).")
  flags.DEFINE_float("temperature", defaults.temperature, "Text sampling temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", defaults.top_k, "Sample among the k most likely ids (0 = off).")
  flags.DEFINE_float("top_p", defaults.top_p, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_float("image_temperature", defaults.image_temperature, "Discrete-image runs (data.codec = vq): "
                     "temperature of the image tokens (0 = greedy).")
  flags.DEFINE_integer("image_top_k", defaults.image_top_k, "Discrete-image runs: image tokens among the k most "
                       "likely codes (0 = all).")
  flags.DEFINE_integer("max_new_tokens", 32, "Text tokens generated per prompt.")
  flags.DEFINE_integer("max_images", 1, "Images per prompt in interleaved mode.")
  app.run(main)
