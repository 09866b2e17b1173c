"""Latent codecs: how images become the continuous latents that diffusion runs on, and back.

Every codec maps uint8 images [..., H, W, 3] to float latents [..., H/f, W/f, c] and back, and
says how far latents may range (the sampler clips its x0 estimate to that range when it is set).

- `identity`: pixels as latents, scaled to [-1, 1].
- `vae`: a frozen KL-VAE (tfusion.models.vae), from a `tfusion.train_vae` workdir or a diffusers
  AutoencoderKL directory. Latents are the posterior mean, normalised per channel with a shift and
  scale measured on the training images when the dataset is encoded (`python -m tfusion.encode_latents`),
  so diffusion sees zero-mean unit-variance latents. The measurement is the codec's metadata
  (`codec.json`, in the latent cache and in every Transfusion run that trains on it).

- `vq`: a frozen VQ-VAE (a `tfusion.train_vae` run with model.bottleneck = "vq"), the Chameleon baseline's
  image tokenizer. Its "latents" are code indices [..., H/f, W/f, 1], held in float32 (exact below 2^24) so they
  travel the paths continuous latents do; the model reads them as tokens (data.sequence.image_tokens).
  `python -m tfusion.encode_latents` caches the codes; codec.json records the VQ-VAE and its code usage.
"""
import dataclasses
import functools
import json
import os
import shutil
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import safetensors.numpy

from tfusion import config as config_lib, run_dir, sharding
from tfusion.models import vae as vae_lib

ENCODE_BATCH = 64   # images per VAE call (rounded up to whole rows per device); the last batch is padded


@dataclasses.dataclass(frozen=True)
class IdentityCodec:
  """Pixels as latents: uint8 [0, 255] <-> float32 [-1, 1], f = 1, c = 3."""
  name: str = "identity"
  value_range: float | None = 1.0

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> float32 [..., S, S, 3] in [-1, 1]."""
    return pixels_to_unit(images)

  def decode(self, latents) -> np.ndarray:
    """float [..., S, S, 3] -> uint8 [..., S, S, 3] (values outside [-1, 1] are clipped)."""
    return unit_to_pixels(latents)


def pixels_to_unit(images) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def unit_to_pixels(x) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _local_shardings() -> tuple[NamedSharding, NamedSharding]:
  """(replicated, rows split) over this process's devices: the VAE runs data parallel on them."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


@functools.lru_cache(maxsize=8)
def _vae_programs(config: vae_lib.VAEConfig):
  """Jitted (encode -> posterior mean, decode) of one VAE architecture, data parallel over local devices."""
  model = vae_lib.AutoencoderKL(config)
  replicated, rows = _local_shardings()
  jit = functools.partial(jax.jit, in_shardings=(replicated, rows), out_shardings=rows)
  encode = jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)[0])
  decode = jit(lambda p, z: model.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode))
  n = jax.local_device_count()
  return encode, decode, -(-ENCODE_BATCH // n) * n


@functools.lru_cache(maxsize=8)
def _vq_programs(model: vae_lib.VQModel):
  """Jitted (encode -> codes, decode codes) of one VQ-VAE, data parallel over local devices."""
  replicated, rows = _local_shardings()
  jit = functools.partial(jax.jit, in_shardings=(replicated, rows), out_shardings=rows)
  encode = jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.VQModel.encode))
  decode = jit(lambda p, codes: model.apply({"params": p}, codes, method=vae_lib.VQModel.decode))
  n = jax.local_device_count()
  return encode, decode, -(-ENCODE_BATCH // n) * n


def vq_reconstruct(model: vae_lib.VQModel, params, images: np.ndarray) -> np.ndarray:
  """uint8 images [N, S, S, 3] -> their codes int32 [N, S/f, S/f] -> uint8 reconstructions (on this process)."""
  codec = VqCodec(model, jax.device_put(params, _local_shardings()[0]), metadata={})
  return codec.decode(codec.codes(images)[..., None])


@dataclasses.dataclass(frozen=True, eq=False)
class VqCodec:
  """A frozen VQ-VAE: uint8 images <-> code indices [..., h, w, 1] (float32 holding ints)."""
  model: vae_lib.VQModel
  params: Any                 # replicated on this process's devices
  metadata: dict              # what codec.json records
  name: str = "vq"
  value_range: float | None = None   # codes are not clipped

  @property
  def codebook_size(self) -> int:
    return self.model.codebook_size

  @property
  def downsample(self) -> int:
    return self.model.config.downsample

  def codes(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> code indices int32 [N, S/f, S/f]."""
    encode, _, batch = _vq_programs(self.model)
    return _in_batches(lambda x: encode(self.params, pixels_to_unit(x)), np.asarray(images), batch).astype(np.int32)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> codes [..., S/f, S/f, 1] float32."""
    images = np.asarray(images)
    codes = self.codes(images.reshape(-1, *images.shape[-3:]))
    return codes.reshape(*images.shape[:-3], *codes.shape[1:], 1).astype(np.float32)

  def decode(self, latents) -> np.ndarray:
    """codes [..., h, w, 1] (any numeric dtype) -> uint8 images [..., h f, w f, 3]."""
    _, decode, batch = _vq_programs(self.model)
    latents = np.asarray(latents)
    codes = np.rint(latents.reshape(-1, *latents.shape[-3:-1])).astype(np.int32)
    images = _in_batches(lambda c: decode(self.params, c), codes, batch)
    return unit_to_pixels(images).reshape(*latents.shape[:-3], *images.shape[1:])


def _in_batches(fn, x: np.ndarray, batch: int) -> np.ndarray:
  """fn over [N, ...] in fixed-size batches (the last one padded), concatenated back to N rows."""
  out = []
  for start in range(0, len(x), batch):
    part = x[start:start + batch]
    out.append(np.asarray(fn(sharding.pad_rows(part, batch)))[:len(part)])
  return np.concatenate(out)


@dataclasses.dataclass(frozen=True, eq=False)
class VaeCodec:
  """A frozen VAE: uint8 images <-> (posterior mean - shift) / scale, per latent channel."""
  vae: vae_lib.VAEConfig
  params: Any                 # replicated on this process's devices
  shift: np.ndarray           # [c]
  scale: np.ndarray           # [c]
  metadata: dict              # what codec.json records
  name: str = "vae"
  value_range: float | None = None   # the largest |normalised latent| measured on the training images

  @property
  def downsample(self) -> int:
    return self.vae.downsample

  def raw_latents(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> posterior means [N, S/f, S/f, c] float32, before normalisation."""
    encode, _, batch = _vae_programs(self.vae)
    return _in_batches(lambda x: encode(self.params, pixels_to_unit(x)), np.asarray(images), batch)

  def normalize(self, raw: np.ndarray) -> np.ndarray:
    return ((np.asarray(raw, np.float32) - self.shift) / self.scale).astype(np.float32)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> normalised latents [..., S/f, S/f, c]."""
    images = np.asarray(images)
    flat = images.reshape(-1, *images.shape[-3:])
    latents = self.normalize(self.raw_latents(flat))
    return latents.reshape(*images.shape[:-3], *latents.shape[1:])

  def decode(self, latents) -> np.ndarray:
    """Normalised latents [..., h, w, c] -> uint8 images [..., h f, w f, 3]."""
    _, decode, batch = _vae_programs(self.vae)
    latents = np.asarray(latents, np.float32)
    flat = latents.reshape(-1, *latents.shape[-3:]) * self.scale + self.shift
    images = _in_batches(lambda z: decode(self.params, z), flat, batch)
    return unit_to_pixels(images).reshape(*latents.shape[:-3], *images.shape[1:])


# ----------------------------------------------------------------------------------------------
# Loading a VAE and a codec.
# ----------------------------------------------------------------------------------------------
def vae_config_of_run(vae_run_config) -> vae_lib.VAEConfig:
  """The VAEConfig of a tfusion.train_vae config (its `model` group)."""
  m = vae_run_config.model
  return vae_lib.VAEConfig(block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                           latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups)


def autoencoder_of_run(vae_run_config) -> vae_lib.AutoencoderKL | vae_lib.VQModel:
  """The model of a tfusion.train_vae config: the KL-VAE, or the VQ-VAE when model.bottleneck is "vq"."""
  vae, m = vae_config_of_run(vae_run_config), vae_run_config.model
  if m.bottleneck == "vq":
    return vae_lib.VQModel(vae, m.codebook_size, m.vq_dim)
  return vae_lib.AutoencoderKL(vae)


def _latest_params(run: run_dir.RunDir, model) -> tuple[Any, int]:
  """(numpy params, step) of a train_vae run's latest checkpoint, for its AutoencoderKL or VQModel."""
  f, channels = model.config.downsample, model.config.in_channels
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, f, f, channels))))
  return run.restore_params(None, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["params"])))


def load_vae(path: str) -> tuple[vae_lib.VAEConfig, Any, dict]:
  """(architecture, numpy params, provenance) of a VAE: a tfusion.train_vae workdir (latest checkpoint)
  or a diffusers AutoencoderKL directory / .safetensors file."""
  path = os.path.abspath(os.path.expanduser(path))
  run = run_dir.RunDir(path)
  if run.is_run():
    run_config = run.read_config(config_lib.default_vae_config())
    if run_config.model.bottleneck != "kl":
      raise ValueError(f"{path} is a VQ-VAE run (model.bottleneck = {run_config.model.bottleneck!r}): its codes are "
                       f"not continuous latents; a latent codec needs a KL-VAE run")
    vae = vae_config_of_run(run_config)
    if not run.saved_steps():
      raise FileNotFoundError(f"VAE run {path} has no checkpoint yet: train it with python -m tfusion.train_vae")
    params, step = _latest_params(run, vae_lib.AutoencoderKL(vae))
    return vae, params, {"vae": path, "vae_format": "tfusion", "vae_step": int(step)}
  if os.path.isdir(path) or path.endswith(".safetensors"):
    vae, params = vae_lib.load_diffusers(path)
    return vae, params, {"vae": path, "vae_format": "diffusers", "vae_step": None}
  raise FileNotFoundError(f"config.data.vae = {path!r}: neither a tfusion.train_vae workdir (config.json + "
                          f"checkpoints/) nor a diffusers AutoencoderKL directory or .safetensors file")


def frozen_codec(path: str) -> "VaeCodec | VqCodec":
  """The raw codec of the VAE at `path`: a VqCodec for a VQ-VAE run, else vae_codec(path) (shift 0, scale 1)."""
  run = run_dir.RunDir(os.path.abspath(os.path.expanduser(path)))
  if run.is_run() and run.read_config(config_lib.default_vae_config()).model.bottleneck == "vq":
    return vq_codec(path)
  return vae_codec(path)


VQ_WEIGHTS = "vqvae.safetensors"   # an exported VQ-VAE: this file and the train_vae config.json beside it


def vq_codec(path: str) -> VqCodec:
  """The codec of the VQ-VAE at `path`: a tfusion.train_vae workdir with model.bottleneck = "vq" (its latest
  checkpoint), or a directory written by save_vq (an export's)."""
  path = os.path.abspath(os.path.expanduser(path))
  run = run_dir.RunDir(path)
  exported = os.path.isfile(os.path.join(path, VQ_WEIGHTS))
  if not exported and not run.is_run():
    raise FileNotFoundError(f"config.data.vae = {path!r}: not a tfusion.train_vae workdir (config.json + "
                            f"checkpoints/); the vq codec needs a VQ-VAE run")
  run_config = run.read_config(config_lib.default_vae_config())
  if run_config.model.bottleneck != "vq":
    raise ValueError(f"config.data.vae = {path!r} is a KL-VAE run: the vq codec needs model.bottleneck = 'vq'")
  model = autoencoder_of_run(run_config)
  if exported:
    flat = safetensors.numpy.load_file(os.path.join(path, VQ_WEIGHTS))
    params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    with open(os.path.join(path, VQ_WEIGHTS + ".json")) as f:
      step = json.load(f)["step"]
  else:
    if not run.saved_steps():
      raise FileNotFoundError(f"VQ-VAE run {path} has no checkpoint yet: train it with python -m tfusion.train_vae")
    params, step = _latest_params(run, model)
  metadata = dict(codec="vq", vae=path, vae_format="tfusion", vae_step=int(step), codebook_size=model.codebook_size,
                  downsample=model.config.downsample)
  return VqCodec(model, jax.device_put(params, _local_shardings()[0]), metadata)


def save_vq(directory: str, codec: VqCodec) -> None:
  """The codec's VQ-VAE as a self-contained directory vq_codec reads: its train_vae config.json, the params in
  vqvae.safetensors (names joined by "/") and the step they are from."""
  os.makedirs(directory, exist_ok=True)
  source = run_dir.RunDir(codec.metadata["vae"])
  shutil.copyfile(source.config_file, os.path.join(directory, os.path.basename(source.config_file)))
  flat = flax.traverse_util.flatten_dict(jax.device_get(codec.params), sep="/")
  safetensors.numpy.save_file({k: np.asarray(v) for k, v in flat.items()}, os.path.join(directory, VQ_WEIGHTS))
  with open(os.path.join(directory, VQ_WEIGHTS + ".json"), "w") as f:
    json.dump({"step": codec.metadata["vae_step"]}, f)


def vae_codec(path: str, shift=None, scale=None, measured: dict | None = None,
              value_range: float | None = None) -> VaeCodec:
  """The codec of the VAE at `path`; without shift and scale, raw latents (shift 0, scale 1). value_range: the
  largest |normalised latent| of the training images, if measured."""
  vae, params, provenance = load_vae(path)
  c = vae.latent_channels
  shift = np.zeros(c, np.float32) if shift is None else np.asarray(shift, np.float32).reshape(c)
  scale = np.ones(c, np.float32) if scale is None else np.asarray(scale, np.float32).reshape(c)
  metadata = dict(codec="vae", **provenance, latent_channels=c, downsample=vae.downsample,
                  shift=shift.tolist(), scale=scale.tolist(), **(measured or {}))
  if value_range is not None:
    metadata["value_range"] = value_range
  return VaeCodec(vae, jax.device_put(params, _local_shardings()[0]), shift, scale, metadata,
                  value_range=value_range)


def read_codec_metadata(path: str) -> dict:
  """The codec.json at `path` (a file, or a directory holding one)."""
  path = os.path.join(path, run_dir.CODEC_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: encode the dataset first (python -m tfusion.encode_latents)")
  with open(path) as f:
    return json.load(f)


def codec_from_metadata(metadata: dict) -> VaeCodec | VqCodec:
  if metadata.get("codec") == "vq":
    return vq_codec(metadata["vae"])
  if "value_range" not in metadata:
    logging.warning("the codec of %s records no value_range (latents encoded by an older tfusion): sampled x0 "
                    "estimates are not clipped; encode the latents again to measure it", metadata["vae"])
  return vae_codec(metadata["vae"], metadata["shift"], metadata["scale"],
                   {k: metadata[k] for k in ("images_measured",) if k in metadata}, metadata.get("value_range"))


def make_codec(data_config, metadata_dir: str | None = None):
  """The codec named by config.data.codec. The vae codec reads its codec.json from `metadata_dir` (a
  run's workdir) when that holds one, else from config.data.latent_cache."""
  if data_config.codec == "identity":
    return IdentityCodec()
  if data_config.codec not in config_lib.CODECS:
    raise ValueError(f"config.data.codec = {data_config.codec!r}: unknown codec (available: {config_lib.CODECS})")
  if metadata_dir and os.path.isfile(os.path.join(metadata_dir, run_dir.CODEC_FILE)):
    metadata = read_codec_metadata(metadata_dir)
    if not os.path.isabs(os.path.expanduser(metadata["vae"])):    # an export's own vae/ directory
      metadata = dict(metadata, vae=os.path.join(metadata_dir, metadata["vae"]))
  elif data_config.latent_cache:
    metadata = read_codec_metadata(os.path.expanduser(data_config.latent_cache))
  else:
    raise ValueError("config.data.latent_cache is empty: the vae codec needs the latents (and their shift "
                     "and scale) written by python -m tfusion.encode_latents")
  codec = codec_from_metadata(metadata)
  check_latent_shape(codec, data_config)
  return codec


def check_latent_shape(codec, data_config) -> None:
  """ValueError naming the config field when the VAE's latents (or the VQ-VAE's codes) do not match config.data."""
  if isinstance(codec, VqCodec):
    if data_config.codec != "vq":
      raise ValueError(f"config.data.codec = {data_config.codec!r}, but {codec.metadata['vae']} is a VQ-VAE: set "
                       f"config.data.codec = 'vq'")
    if codec.codebook_size != data_config.codebook_size:
      raise ValueError(f"config.data.codebook_size = {data_config.codebook_size}, but the VQ-VAE "
                       f"{codec.metadata['vae']} has {codec.codebook_size} codes")
    if codec.model.config.downsample != data_config.latent_downsample:
      raise ValueError(f"config.data.latent_downsample = {data_config.latent_downsample}, but the VQ-VAE "
                       f"{codec.metadata['vae']} downsamples by {codec.model.config.downsample}")
    return
  if data_config.codec != "vae":
    raise ValueError(f"config.data.codec = {data_config.codec!r}, but {codec.metadata['vae']} is a KL-VAE: set "
                     f"config.data.codec = 'vae'")
  if codec.vae.latent_channels != data_config.latent_channels:
    raise ValueError(f"config.data.latent_channels = {data_config.latent_channels}, but the VAE "
                     f"{codec.metadata['vae']} has {codec.vae.latent_channels} latent channels")
  if codec.vae.downsample != data_config.latent_downsample:
    raise ValueError(f"config.data.latent_downsample = {data_config.latent_downsample}, but the VAE "
                     f"{codec.metadata['vae']} downsamples by {codec.vae.downsample}")
