r"""Export a training checkpoint for downstream use.

  python -m tfusion.export --workdir RUN [--step N] --out DIR [--dtype bfloat16]

DIR is self-contained (it can be moved or copied to a bucket):
  params/             orbax checkpoint of the params only (no optimizer state, no data position)
  model.safetensors   the same params, flat names joined by "/" (e.g. transformer/layers/attention/query/kernel)
  config.json         the run's config; tokenizer.model; export.json (source run, step, dtype)
  codec.json, vae/    latent runs: the codec (shift, scale) and the VAE in the diffusers layout; vq runs: the codec
                      and the VQ-VAE (codecs.save_vq)

`tfusion.load(DIR)` (inference.sampler.load_export) returns a Sampler on the given mesh, or on the run's mesh
when it fits the devices, else data parallel.
"""
import json
import os
import shutil

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from tfusion import codecs, distributed, run_dir
from tfusion.inference import sampler as sampler_lib
from tfusion.models import vae as vae_lib

DTYPES = ("float32", "bfloat16")


def flat_params(params) -> dict[str, np.ndarray]:
  """{"a/b/kernel": numpy array} of a params tree (bfloat16 stays bfloat16)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(jax.device_get(v)) for path, v in flat}


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32", weights: str = "ema") -> str:
  """Write the export of `workdir`'s checkpoint (latest, or `step`) to `out`: the params' EMA when the run keeps
  one, unless weights = "raw"; returns out."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r}: one of {DTYPES}")
  sampler = sampler_lib.load(workdir, step, weights=weights)
  params = jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), sampler.params)
  export_dir = run_dir.ExportDir(out)
  if os.path.exists(export_dir.params):
    raise FileExistsError(f"{export_dir.path} already holds an export; choose another --out")
  os.makedirs(export_dir.path, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(export_dir.params, params)
  if distributed.is_chief():
    safetensors.numpy.save_file(flat_params(params), export_dir.safetensors)
    shutil.copyfile(run_dir.RunDir(workdir).config_file, export_dir.config_file)
    sampler.tokenizer.save(export_dir.tokenizer_file)
    if isinstance(sampler.codec, (codecs.VaeCodec, codecs.VqCodec)):
      if isinstance(sampler.codec, codecs.VqCodec):
        codecs.save_vq(export_dir.vae, sampler.codec)
        vae_format = "tfusion"
      else:
        vae_lib.save_diffusers(export_dir.vae, sampler.codec.vae, jax.device_get(sampler.codec.params))
        vae_format = "diffusers"
      metadata = dict(sampler.codec.metadata, vae=os.path.basename(export_dir.vae), vae_format=vae_format,
                      exported_from=sampler.codec.metadata["vae"])
      with open(export_dir.codec_file, "w") as f:
        json.dump(metadata, f, indent=2)
    with open(export_dir.info_file, "w") as f:
      json.dump(dict(workdir=os.path.abspath(workdir), step=sampler.step, dtype=dtype, weights=sampler.weights), f,
                indent=2)
  return export_dir.path


def main(argv):
  distributed.start_command(argv, ("workdir", "out"))
  args = flags.FLAGS
  print(export(args.workdir, args.out, args.step, args.dtype, args.weights))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "Export directory (created; must not hold an export).")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "Params dtype of the export.")
  flags.DEFINE_enum("weights", "ema", sampler_lib.WEIGHTS, "ema: the params' moving average when the run keeps one; "
                    "raw: the trained params.")
  distributed.define_flags()
  app.run(main)
