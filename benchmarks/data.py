r"""Input-pipeline throughput at seq_len 4096 on prepared latents, next to what the 0.16B train step consumes.

  python benchmarks/data.py [--rows 512] [--workers 0,2] [--images 4096] [--docs 1024]

Writes a prepared text corpus (tfusion.prepare on a generated .jsonl) and a prepared
image-caption set of raw 32x32x8 latents (256 px images under an f = 8 VAE, written directly: encoding is
not what is measured), then runs the training input pipeline (tfusion.data.mixture + pipeline, 1:1 mix,
80/20 caption order, 8 rows per batch) and times rows and non-padding elements per second.

The step's consumption is bounded from above in the same run: this host's measured float32 matmul peak
divided by the model FLOPs of one 4096-element row of the 0.16B config (forward + backward). The step cannot
consume faster than that (it would need 100% MFU), so supply / consumption is a lower bound of the margin.
Prints a table and writes benchmarks/results/data.json.
"""
import argparse
import json
import os
import tempfile
import time

from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from tfusion import codecs, config as config_lib, flops, prepare as prepare_lib, run_dir, spec as spec_lib
from tfusion.data import latent_cache, mixture, pipeline, prepared, sequence
from tfusion.models import vae as vae_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a red small dog runs over green field near tall tree under blue sky with two cats sitting on "
         "wooden bench beside old house river city street night light people walking").split()


def write_text_corpus(path: str, docs: int, rng) -> None:
  with open(path, "w") as f:
    for _ in range(docs):
      words = rng.choice(WORDS, size=int(rng.integers(200, 3000)))
      f.write(json.dumps({"text": " ".join(words)}) + "\n")


def write_latent_set(out: str, images: int, vae_dir: str, rng) -> None:
  """A prepared image-caption directory of raw latents [32, 32, 8], with its manifest and codec.json."""
  os.makedirs(out, exist_ok=True)
  file = prepared.shard_file("train", 0, 1)
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  writer = array_record_module.ArrayRecordWriter(os.path.join(out, file), "group_size:1")
  for _ in range(images):
    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30))))
    writer.write(prepared.encode_record({"caption": caption.encode(),
                                         "latents": rng.standard_normal((32, 32, 8)).astype(np.float32)}))
  writer.close()
  codec = codecs.vae_codec(vae_dir)
  latent_cache.write_metadata(out, dict(codec.metadata, image_size=256, splits={"train": images}))
  shard = dict(file=file, examples=images, bytes=os.path.getsize(os.path.join(out, file)), sha256="")
  manifest = dict(kind="image_caption", source="benchmark", path=out, image_size=256, latents=True,
                  splits={"train": dict(examples=images, skipped=0, skipped_by_reason={}, bytes=shard["bytes"],
                                        shards=[shard])}, content_hash="", tokenizer_sha256=None)
  with open(os.path.join(out, prepared.MANIFEST), "w") as f:
    json.dump(manifest, f)


def save_random_vae(directory: str) -> None:
  """An f = 8, 8-channel VAE with small widths: only its codec metadata is used (latents are cached)."""
  vae = vae_lib.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8, norm_num_groups=4)
  params = vae_lib.AutoencoderKL(vae).init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))["params"]
  vae_lib.save_diffusers(directory, vae, jax.tree.map(np.asarray, params))


def run_config(root: str, rows: int):
  c = config_lib.load_experiment(os.path.join(REPO, "experiments", "transfusion_paper.py:size=160m"))
  c.batch_size = rows
  c.data.mixture.text = ml_collections.ConfigDict(dict(path=os.path.join(root, "text"), weight=0.5, split="train"))
  c.data.mixture.images = ml_collections.ConfigDict(dict(path=os.path.join(root, "images"), weight=0.5,
                                                         split="train"))
  spec_lib.resolve(c)
  return c


def time_pipeline(config, workdir: str, workers: int, rows: int) -> dict:
  os.makedirs(workdir, exist_ok=True)
  codec = mixture.run_codec(config, workdir)
  data = mixture.training_data(config, workdir, codec)
  special = sequence.SpecialIds.of(data.tokenizer)
  layout = spec_lib.resolve(config).layout
  mix = pipeline.MixOptions(config.data.caption_first_prob, config.diffusion.num_timesteps,
                            config.diffusion.image_first_max_t, config.seed, config.data.caption_dropout_prob)
  batches = pipeline.train_batches(data.sources, layout, special, mix, config.batch_size, workers=workers,
                                   prefetch=4)
  try:
    next(batches)                               # worker start-up and first rows are not timed
    start, elements, done = time.perf_counter(), 0, 0
    while done < rows:
      batch = next(batches)
      elements += int((batch["segment_ids"] > 0).sum())
      done += len(batch["segment_ids"])
    seconds = time.perf_counter() - start
  finally:
    batches.close()
  return dict(workers=workers, rows=done, seconds=seconds, rows_per_sec=done / seconds,
              elements_per_sec=elements / seconds, packing_efficiency=elements / (done * config.seq_len))


def prepared_vocab_size(text_dir: str) -> int:
  from tfusion.data import tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.Tokenizer.load(os.path.join(text_dir, run_dir.TOKENIZER_FILE)).vocab_size


def step_consumption(config, vocab_size: int) -> dict:
  """Upper bound of the 0.16B step's rows/s on this host: matmul peak / model FLOPs per row."""
  spec = spec_lib.resolve(config)
  model = spec.transfusion(vocab_size)
  batch = jax.eval_shape(lambda: sequence.dummy_batch(1, spec.layout))
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), *sequence.model_inputs(sequence.dummy_batch(1, spec.layout))))["params"])
  row_flops = flops.train_flops(model, params, sequence.model_inputs(batch))
  peak = flops.measured_matmul_tflops.__wrapped__("float32", size=2048, repeats=5) * 1e12
  return dict(model_tflops_per_row=row_flops / 1e12, matmul_peak_tflops=peak / 1e12, rows_per_sec=peak / row_flops,
              elements_per_sec=peak / row_flops * config.seq_len)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=512, help="rows timed per worker setting")
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--images", type=int, default=4096)
  parser.add_argument("--docs", type=int, default=1024)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "data.json"))
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()      # grain worker processes read absl flags
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root:
    save_random_vae(os.path.join(root, "vae"))
    write_text_corpus(os.path.join(root, "corpus.jsonl"), args.docs, rng)
    c = config_lib.default_prepare_config()
    c.source, c.path, c.tokenizer_sample = "jsonl", os.path.join(root, "corpus.jsonl"), args.docs
    prepare_lib.prepare(c, os.path.join(root, "text"))
    write_latent_set(os.path.join(root, "images"), args.images, os.path.join(root, "vae"), rng)
    config = run_config(root, rows=8)
    runs = [time_pipeline(config, os.path.join(root, "run"), int(w), args.rows) for w in args.workers.split(",")]
    vocab = prepared_vocab_size(os.path.join(root, "text"))
  consumption = step_consumption(config, vocab)
  results = dict(device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), seq_len=config.seq_len,
                 rows_per_batch=config.batch_size, pipeline=runs, step_upper_bound=consumption)
  print(f"input pipeline at seq_len {config.seq_len} (prepared 32x32x8 latents + prepared text, 1:1 by elements), "
        f"{results['cpu_count']} cores")
  print(f"{'workers':>8}{'rows/s':>10}{'elements/s':>12}{'packing':>9}{'x step bound':>14}")
  for r in runs:
    r["supply_over_step_bound"] = r["rows_per_sec"] / consumption["rows_per_sec"]
    print(f"{r['workers']:>8}{r['rows_per_sec']:>10.1f}{r['elements_per_sec']:>12.0f}{r['packing_efficiency']:>9.1%}"
          f"{r['supply_over_step_bound']:>14.0f}")
  print(f"0.16B step, one row of {config.seq_len}: {consumption['model_tflops_per_row']:.2f} TFLOP; at this host's "
        f"float32 matmul peak {consumption['matmul_peak_tflops']:.3f} TFLOP/s it consumes at most "
        f"{consumption['rows_per_sec']:.4f} rows/s ({consumption['elements_per_sec']:.0f} elements/s)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
