"""The inference API: a trained model ready to sample, and its loaders from a run directory or an export.

  sampler = sampler_lib.load(run_directory)      # or load_export(export_directory); tfusion.load(DIR)
  sampler.text_to_image(captions, options, key), .caption(images, ...), .continue_text(prompts, ...),
  .interleaved(prompts, ...)

Decoding itself is inference/decoding.py (KV cache, CFG, DDPM/DDIM).
"""
import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tfusion import codecs, run_dir, sharding, spec as spec_lib
from tfusion.data import sequence, tokenizer as tokenizer_lib
from tfusion.inference import decoding
from tfusion.models import transfusion

WEIGHTS = ("ema", "raw")


@dataclasses.dataclass
class Sampler:
  """A trained model ready to sample: config (a run's ConfigDict), params (on `mesh`, or on one device), the
  run's tokenizer and latent codec (default: codecs.make_codec(config.data)). Every method takes
  SamplingOptions and a PRNG key."""
  config: object
  params: object
  tokenizer: tokenizer_lib.Tokenizer
  mesh: jax.sharding.Mesh | None = None
  codec: object = None
  step: int | None = None     # the training step of the params, when known
  weights: str | None = None  # "ema" (the params' moving average) or "raw", when known
  spec: spec_lib.RunSpec = dataclasses.field(init=False)
  model: transfusion.Transfusion = dataclasses.field(init=False)
  special: sequence.SpecialIds = dataclasses.field(init=False)

  def __post_init__(self):
    self.spec = spec_lib.resolve(self.config)
    self.model = self.spec.transfusion(self.tokenizer.vocab_size)
    self.codec = self.codec or codecs.make_codec(self.config.data)
    self.special = sequence.SpecialIds.of(self.tokenizer)

  @property
  def alpha_bar(self) -> np.ndarray:
    return self.spec.alpha_bar

  @property
  def discrete_images(self) -> bool:
    """Images are VQ code tokens (the Chameleon baseline)."""
    return self.spec.discrete_images

  def _image_piece(self, latents: np.ndarray):
    """A clean context image: an ImagePiece, or with discrete images the text piece [BOI codes EOI]."""
    if self.discrete_images:
      return sequence.TextPiece(sequence.image_tokens(latents, self.model.cfg.image_token_offset, self.special))
    return sequence.ImagePiece(latents, 0)

  def _text(self, text: str, *extra: int) -> sequence.TextPiece:
    return sequence.TextPiece(np.array([self.special.bos, *self.tokenizer.encode(text), *extra], np.int32))

  def _decode(self, prompts, task, options, key):
    options = dataclasses.replace(options, clip_x0=options.clip_x0 or self.codec.value_range)
    return decoding.decode(self.model, self.params, prompts, task, self.special, self.alpha_bar, options, key,
                           self.mesh)

  def _until_eos(self, ids: list[int]) -> list[int]:
    return ids[:ids.index(self.special.eos)] if self.special.eos in ids else ids

  def _cut(self, ids: list[int]) -> str:
    return self.tokenizer.decode(self._until_eos(ids))

  def latents(self, captions: list[str], options: decoding.SamplingOptions, key) -> np.ndarray:
    """Image latents [N, h, w, c] float32 generated from captions ("" = unconditional); with discrete images the
    code grids [N, h, w, 1]."""
    prompts = [[self._text(c, self.special.boi)] for c in captions]
    options = dataclasses.replace(options, max_images=1)
    return np.stack([g.images[0] for g in self._decode(prompts, decoding.IMAGE, options, key)])

  def text_to_image(self, captions: list[str], options: decoding.SamplingOptions, key) -> np.ndarray:
    """Images [N, S, S, 3] uint8 generated from captions."""
    return self.codec.decode(self.latents(captions, options, key))

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 images [N, S, S, 3] at the run's image size -> latents; ValueError on another size."""
    size = self.spec.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images of shape {images.shape[1:]}: this model reads {size}x{size} RGB images")
    return self.codec.encode(images)

  def caption(self, images: np.ndarray, options: decoding.SamplingOptions, key) -> list[str]:
    """Captions of uint8 images [N, S, S, 3], decoded after [BOS BOI image EOI] (clean image)."""
    prompts = [[self._text(""), self._image_piece(lat)] for lat in self.encode_images(images)]
    return [self._cut(g.tokens) for g in self._decode(prompts, decoding.CAPTION, options, key)]

  def continue_text(self, prompts: list[str], options: decoding.SamplingOptions, key) -> list[str]:
    """The text each prompt continues with, up to EOS or options.max_new_tokens."""
    generations = self._decode([[self._text(p)] for p in prompts], decoding.TEXT, options, key)
    return [self._cut(g.tokens) for g in generations]

  def interleaved(self, prompts: list[str], options: decoding.SamplingOptions, key) -> list[list]:
    """Free mixed-modal continuation: per prompt, a list of str and uint8 [S, S, 3] images in order;
    the model decides when to draw BOI (at most options.max_images images)."""
    results = []
    for g in self._decode([[self._text(p)] for p in prompts], decoding.INTERLEAVED, options, key):
      parts, start = [], 0
      tokens = self._until_eos(g.tokens)
      for image, at in zip(self.codec.decode(g.images), g.image_positions):
        parts += [self.tokenizer.decode(tokens[start:at]), image]
        start = at
      parts.append(self.tokenizer.decode(tokens[start:]))
      results.append([p for p in parts if not isinstance(p, str) or p])
    return results


def load(workdir: str, step: int | None = None, mesh=None, weights: str = "ema") -> Sampler:
  """The Sampler of a training run directory, from its latest (or `step`) checkpoint: params only, their EMA
  when the run keeps one (config.ema_decay > 0) unless weights = "raw"."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights = {weights!r}: one of {WEIGHTS}")
  run = run_dir.RunDir(workdir)
  config = run.read_config()
  tok = run.tokenizer()
  mesh = mesh or generation_mesh(config)
  item = "ema_params" if weights == "ema" and config.ema_decay > 0 else "params"
  params, step = run.restore_params(step, abstract_params(spec_lib.resolve(config), tok.vocab_size, mesh), item)
  logging.info("loaded the %s of step %d of %s", item, step, workdir)
  return Sampler(config, params, tok, mesh, codecs.make_codec(config.data, run.path), step=step,
                 weights="ema" if item == "ema_params" else "raw")


def load_export(path: str, mesh=None) -> Sampler:
  """The Sampler of an export directory written by python -m tfusion.export, on `mesh` (default: the run's mesh
  when it fits the devices, else data parallel)."""
  export = run_dir.ExportDir(path)
  info = export.read_info()
  config = export.read_config()
  tok = export.tokenizer()
  mesh = mesh or generation_mesh(config)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(info["dtype"]), sharding=a.sharding),
                        abstract_params(spec_lib.resolve(config), tok.vocab_size, mesh))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(export.params, target)
  logging.info("loaded the export %s (step %d of %s, %s)", export.path, info["step"], info["workdir"], info["dtype"])
  return Sampler(config, params, tok, mesh, codecs.make_codec(config.data, export.path), step=info["step"],
                 weights=info.get("weights"))


def abstract_params(spec: spec_lib.RunSpec, vocab_size: int, mesh):
  """The run's params as ShapeDtypeStructs with their shardings on `mesh`: the restore target of a checkpoint."""
  model = spec.transfusion(vocab_size)

  def init(key):
    return model.init(key, *sequence.model_inputs(sequence.dummy_batch(1, spec.layout)))["params"]
  abstract, _ = sharding.abstract_init(init, mesh)
  return abstract


def generation_mesh(config, tensor_parallelism: int | None = None):
  """The mesh to decode on, over this machine's devices. tensor_parallelism None: the run's mesh layout, or plain
  data parallelism if it does not fit; k: data x tensor, attention heads and MLP units split over groups of k
  devices (the KV cache too), rows over the groups."""
  if tensor_parallelism is None:
    try:
      return sharding.make_mesh(config.mesh)
    except ValueError as e:
      logging.warning("the run's mesh does not fit these %d devices (%s); sampling data-parallel",
                      jax.device_count(), e)
      return sharding.make_mesh(_mesh_config(tensor=1))
  devices, heads = jax.device_count(), config.model.num_heads
  if tensor_parallelism < 1 or devices % tensor_parallelism or heads % tensor_parallelism:
    raise ValueError(f"tensor_parallelism = {tensor_parallelism} must divide the {devices} devices and the model's "
                     f"{heads} attention heads")
  return sharding.make_mesh(_mesh_config(tensor=tensor_parallelism))


def _mesh_config(tensor: int) -> dict:
  """A one-slice mesh config: `tensor` devices per tensor group, the rest data parallel."""
  return ({f"{k}_{a}_parallelism": 1 for k in ("ici", "dcn") for a in sharding.MESH_AXES}
          | {"ici_data_parallelism": -1, "ici_tensor_parallelism": tensor})
