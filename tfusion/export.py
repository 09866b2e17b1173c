r"""Export a training checkpoint for downstream use, and load an export in one call.

  python -m tfusion.export --workdir RUN [--step N] --out DIR [--dtype bfloat16]

DIR is self-contained (it can be moved or copied to a bucket):
  params/             orbax checkpoint of the params only (no optimizer state, no data position)
  model.safetensors   the same params, flat names joined by "/" (e.g. transformer/layers/attention/query/kernel)
  config.json         the run's config; tokenizer.model; export.json (source run, step, dtype)
  codec.json, vae/    latent runs: the codec (shift, scale) and the VAE in the diffusers layout

`tfusion.load(DIR)` returns a generate.Sampler on the given mesh, or on the run's mesh when it fits the
devices, else data parallel.
"""
import json
import os
import shutil

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from tfusion import codecs, config as config_lib, distributed, generate
from tfusion.data import tokenizer as tokenizer_lib
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
  sampler = generate.load(workdir, step, weights=weights)
  params = jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), sampler.params)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(os.path.join(out, "params")):
    raise FileExistsError(f"{out} already holds an export; choose another --out")
  os.makedirs(out, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out, "params"), params)
  if distributed.is_chief():
    safetensors.numpy.save_file(flat_params(params), os.path.join(out, "model.safetensors"))
    shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    sampler.tokenizer.save(os.path.join(out, "tokenizer.model"))
    if isinstance(sampler.codec, codecs.VaeCodec):
      vae_lib.save_diffusers(os.path.join(out, "vae"), sampler.codec.vae, jax.device_get(sampler.codec.params))
      metadata = dict(sampler.codec.metadata, vae="vae", vae_format="diffusers",
                      exported_from=sampler.codec.metadata["vae"])
      with open(os.path.join(out, codecs.CODEC_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    with open(os.path.join(out, "export.json"), "w") as f:
      json.dump(dict(workdir=os.path.abspath(workdir), step=sampler.step, dtype=dtype, weights=sampler.weights), f,
                indent=2)
  return out


def load(path: str, mesh=None) -> generate.Sampler:
  """The Sampler of an export directory (see the module docstring)."""
  path = os.path.abspath(os.path.expanduser(path))
  info_path = os.path.join(path, "export.json")
  if not os.path.isfile(info_path):
    raise FileNotFoundError(f"{path} is not a tfusion export (no export.json): write one with python -m tfusion.export")
  with open(info_path) as f:
    info = json.load(f)
  with open(os.path.join(path, "config.json")) as f:
    config = config_lib.from_json(f.read(), os.path.join(path, "config.json"))
  tok = tokenizer_lib.Tokenizer.load(os.path.join(path, "tokenizer.model"))
  mesh = mesh or generate.generation_mesh(config)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(info["dtype"]), sharding=a.sharding),
                        generate.abstract_params(config, tok.vocab_size, mesh))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(path, "params"), target)
  logging.info("loaded the export %s (step %d of %s, %s)", path, info["step"], info["workdir"], info["dtype"])
  return generate.Sampler(config, params, tok, mesh, codecs.make_codec(config.data, path), step=info["step"],
                          weights=info.get("weights"))


def main(argv):
  distributed.start_command(argv, ("workdir", "out"))
  args = flags.FLAGS
  print(export(args.workdir, args.out, args.step, args.dtype, args.weights))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "Export directory (created; must not hold an export).")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "Params dtype of the export.")
  flags.DEFINE_enum("weights", "ema", generate.WEIGHTS, "ema: the params' moving average when the run keeps one; "
                    "raw: the trained params.")
  distributed.define_flags()
  app.run(main)
