r"""Encode the embedded shapes data once with a frozen VAE (or VQ-VAE), for training on cached latents (codes).

  python -m tfusion.encode_latents --config experiments/shapes_latent.py

Reads config.data (image_size, data_dir, vae, latent_cache) of a Transfusion experiment, encodes the train and
test splits of the shapes data into config.data.latent_cache (see tfusion.data.latent_cache) and measures the per-channel latent shift and
scale, and the range of the normalised latents, on the train split; with the vq codec it caches code indices and
records the codes used and their perplexity. A cache already written with the same VAE
checkpoint and image size (and these statistics) is kept. Prepared datasets are encoded by
`python -m tfusion.prepare --config.vae=...` instead.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np
import tqdm

from tfusion import codecs, config as config_lib, run_dir, spec as spec_lib
from tfusion.data import latent_cache, shapes

SPLITS = ("train", "test")


def encode_dataset(config) -> dict:
  """Write (or keep) the latent cache of config.data; returns its codec metadata."""
  spec_lib.resolve(config)
  data = config.data
  if data.codec == "identity":
    raise config_lib.ConfigError(f"config.data.codec = {data.codec!r}: only the vae and vq codecs have latents "
                                 "to cache")
  for field in ("vae", "latent_cache"):
    if not data[field]:
      raise config_lib.ConfigError(f"config.data.{field} is empty: the vae codec needs a VAE (a tfusion.train_vae "
                                   "workdir or a diffusers directory) and a directory for its latents")
  cache = os.path.abspath(os.path.expanduser(data.latent_cache))
  codec = codecs.vq_codec(data.vae) if data.codec == "vq" else codecs.vae_codec(data.vae)
  codecs.check_latent_shape(codec, data)
  statistic = "codes_used" if data.codec == "vq" else "value_range"
  if os.path.isfile(os.path.join(cache, run_dir.CODEC_FILE)):
    existing = codecs.read_codec_metadata(cache)
    same = all(existing.get(k) == v for k, v in dict(codec.metadata, image_size=data.image_size).items()
               if k in ("vae", "vae_step", "image_size"))
    if same and statistic in existing:
      logging.info("latent cache %s is up to date (VAE %s step %s)", cache, existing["vae"], existing["vae_step"])
      return existing
  os.makedirs(cache, exist_ok=True)
  data_dir = os.path.expanduser(data.data_dir)
  sources = {split: shapes.load_shapes(data_dir, split, data.image_size) for split in SPLITS}
  statistics = {}
  with tqdm.tqdm(total=sum(map(len, sources.values())), unit="image", desc="encoding") as progress:
    for split, source in sources.items():
      statistics[split] = latent_cache.encode_split(codec, source, latent_cache.split_path(cache, split),
                                                    progress=progress)
  metadata = dict(codec.metadata, **statistics["train"].codec_statistics(), image_size=data.image_size,
                  images_measured=len(sources["train"]), splits={s: len(src) for s, src in sources.items()})
  latent_cache.write_metadata(cache, metadata)
  if data.codec == "vq":
    logging.info("encoded %s into %s; %d of %d codes used, code perplexity %.1f", dict(metadata["splits"]), cache,
                 metadata["codes_used"], codec.codebook_size, metadata["code_perplexity"])
  else:
    logging.info("encoded %s into %s; latent mean %s, std %s, normalised range +-%.2f", dict(metadata["splits"]),
                 cache, np.round(metadata["shift"], 3).tolist(), np.round(metadata["scale"], 3).tolist(),
                 metadata["value_range"])
  return metadata


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required")
  encode_dataset(flags.FLAGS.config)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file (its data group is used).",
                                  lock_config=True)
  app.run(main)
