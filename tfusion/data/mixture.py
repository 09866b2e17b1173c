"""A run's training data: the latent codec, the tokenizer, the weighted sources, and the images samples use.

Without `config.data.mixture` a run trains on the embedded data: shapes image-caption pairs (or their cached
VAE latents) and the pydoc / .jsonl text stream, mixed by data.text_fraction. With it, every entry names a
directory written by `python -m tfusion.prepare`, a split and a weight (its share of the packed elements).

The run's tokenizer is data.tokenizer, else init_from's, else the one the prepared text sources were
tokenized with (they must agree), else one of data.vocab_size pieces trained on the run's captions and
text; it is kept in the workdir, a resumed run refuses a different one, and the model's vocabulary is the
tokenizer's. Latent sources must have been encoded with the run's VAE; all are normalised with the run
codec's statistics (see run_codec).
"""
import dataclasses
import filecmp
import os
import shutil

from absl import logging
import numpy as np

from tfusion import codecs, config as config_lib, distributed, run_dir
from tfusion.data import latent_cache, pipeline, prepared, shapes, text_corpus, tokenizer as tokenizer_lib

TOKENIZER_SAMPLE_CAPTIONS = 5000
_VAE_IDENTITY = ("vae", "vae_step", "latent_channels", "downsample")   # codec.json fields latent sources share


@dataclasses.dataclass
class TrainingData:
  tokenizer: tokenizer_lib.Tokenizer
  sources: list[pipeline.Source]
  sample_examples: object | None    # random access {"caption": bytes, "image": uint8 [S, S, 3]}, or None


def decode_caption(example) -> str:
  return example["caption"].decode("utf-8")


def _latent_dirs(config) -> list[tuple[str, str]]:
  """(mixture entry, path) of the prepared image sources that hold latents."""
  found = []
  for name, entry in config.data.mixture.items():
    manifest = _read_manifest(name, entry.path)
    if manifest["kind"] != "text" and manifest["latents"]:
      found.append((name, os.path.expanduser(entry.path)))
  return found


def run_codec(config, workdir):
  """The run's latent codec. With the vae codec, the latents' codec.json (data.latent_cache, else that of the
  first prepared latent source in name order) is recorded in the workdir on the first run; a resumed run
  refuses latents re-encoded with another VAE or statistics. Every latent source is normalised with this
  shift and scale (they store raw posterior means). The vq codec works the same way with code caches."""
  if config.data.codec == "identity":
    return codecs.make_codec(config.data)
  metadata_dir = os.path.expanduser(config.data.latent_cache) if config.data.latent_cache else None
  if metadata_dir is None and config.data.mixture:
    metadata_dir = next((path for _, path in _latent_dirs(config)), None)
  if metadata_dir is None:
    raise config_lib.ConfigError(f"config.data.latent_cache is empty: the {config.data.codec} codec trains on "
                                 "latents written by python -m tfusion.encode_latents (or prepared with --config.vae)")
  metadata = codecs.read_codec_metadata(metadata_dir)
  recorded = run_dir.RunDir(workdir).codec_file
  if os.path.isfile(recorded) and codecs.read_codec_metadata(recorded) != metadata:
    raise config_lib.ConfigError(f"the latents in {metadata_dir} were encoded with another VAE or statistics than "
                                 f"this run was trained on ({recorded})")
  if distributed.is_chief() and not os.path.isfile(recorded):
    run_dir.write_json(recorded, metadata)
  codec = codecs.codec_from_metadata(metadata)
  codecs.check_latent_shape(codec, config.data)
  return codec


def run_tokenizer(config, workdir: str, sample_texts, prepared_tokenizers: dict[str, str]):
  """The run's tokenizer, kept as <workdir>/tokenizer.model (see the module docstring)."""
  kept = run_dir.RunDir(workdir).tokenizer_file
  given = os.path.expanduser(config.data.tokenizer) if config.data.tokenizer else None
  given_by = "config.data.tokenizer"
  if given is None and config.init_from:
    given, given_by = run_dir.init_source(config.init_from)[0].tokenizer_file, "config.init_from"
  for name, path in prepared_tokenizers.items():
    if given is None:
      given, given_by = path, f"config.data.mixture.{name}"
    elif not filecmp.cmp(given, path, shallow=False):
      raise config_lib.ConfigError(f"config.data.mixture.{name} was tokenized with {path}, but {given_by} uses "
                                   f"{given}: a run has one tokenizer")
  if given is None:
    return tokenizer_lib.load_or_train_tokenizer(kept, sample_texts, config.data.vocab_size)
  if os.path.isfile(kept) and not filecmp.cmp(given, kept, shallow=False):
    raise config_lib.ConfigError(f"this run was trained with the tokenizer {kept}, not {given}")
  tok = tokenizer_lib.Tokenizer.load(given)
  if distributed.is_chief() and not os.path.isfile(kept):
    shutil.copyfile(given, kept)
  return tok


def image_of(example, codec) -> np.ndarray:
  """uint8 [S, S, 3] of an image-caption example holding pixels, raw latents or codes."""
  if "image" in example:
    return example["image"]
  if "codes" in example:
    return codec.decode(example["codes"][..., None])
  return codec.decode(codec.normalize(example["latents"]))


def _latents_fn(codec, pixels: bool):
  """example -> model latents of its image ("image" or f"{key}image" fields): stored raw latents normalised with
  the run's shift and scale, stored codes as [h, w, 1] (the vq codec), or (pixels=True) images encoded by the
  codec. Without pixels the function holds only numpy shift and scale, so grain worker processes receive no VAE."""
  shift, scale = (codec.shift, codec.scale) if isinstance(codec, codecs.VaeCodec) else (None, None)

  def from_latents(example, key=""):
    if f"{key}codes" in example:
      return example[f"{key}codes"][..., None].astype(np.float32)
    return ((example[f"{key}latents"] - shift) / scale).astype(np.float32)

  def from_either(example, key=""):
    if f"{key}latents" in example or f"{key}codes" in example:
      return from_latents(example, key)
    return codec.encode(example[f"{key}image"])

  return from_either if pixels else from_latents


def _builtin_train_images(config):
  """The shapes train split, or its cached latents with the vae codec."""
  data_dir = os.path.expanduser(config.data.data_dir)
  train_images = distributed.chief_first("build shapes", lambda: shapes.load_shapes(data_dir, "train",
                                                                                    config.data.image_size))
  if config.data.codec != "identity":
    train_images = latent_cache.LatentSource(os.path.expanduser(config.data.latent_cache), "train")
  return train_images


def train_image_latents(config, codec, limit: int, batch: int = 1024) -> np.ndarray | None:
  """Model latents [K, h, w, c] of the first `limit` training images: the shapes train split, or the training
  split of a mixture's first image-caption source (None if it has none, or with discrete images). Evaluation's
  reference denoisers use them."""
  if config.data.codec == "vq":
    return None
  source = None
  if not config.data.mixture:
    source = _builtin_train_images(config)
  for name, entry in config.data.mixture.items():
    if _read_manifest(name, entry.path)["kind"] == "image_caption":
      source = _prepared_split(f"config.data.mixture.{name}.split", entry.path, entry.split)
      break
  if source is None:
    return None
  latents = _latents_fn(codec, pixels=True)
  count = min(limit, len(source))
  return np.stack([latents(e) for start in range(0, count, batch)
                   for e in pipeline.take(source, min(batch, count - start), start)])


def _builtin_data(config, workdir, codec) -> TrainingData:
  """Shapes (or their cached latents) and the pydoc / .jsonl text stream, mixed by data.text_fraction."""
  train_images = _builtin_train_images(config)
  documents = text_corpus.load_text_documents(config.data.text_source)
  train_docs, _ = text_corpus.split_documents(documents, config.data.text_test_fraction, config.seed)

  def sample_texts():
    return [decode_caption(e) for e in pipeline.take(train_images, TOKENIZER_SAMPLE_CAPTIONS)] + train_docs

  tok = distributed.chief_first("tokenizer", lambda: run_tokenizer(config, workdir, sample_texts, {}))
  text_ids = [np.array(tok.encode(d), np.int32) for d in train_docs]
  latents = _latents_fn(codec, pixels=config.data.codec == "identity")
  sources = [pipeline.Source("text", "text", text_ids, lambda ids: ids, config.data.text_fraction),
             pipeline.Source("images", "image_caption", train_images,
                             lambda e: (tok.encode(decode_caption(e)), latents(e)), 1 - config.data.text_fraction)]
  return TrainingData(tok, sources, sample_examples(config, codec))


def _check_prepared(config, name: str, manifest: dict, path: str, codec) -> None:
  """ConfigError when a prepared image source does not fit the run's image size or codec."""
  if manifest["kind"] == "text":
    return
  field = f"config.data.mixture.{name}"
  path = os.path.expanduser(path)
  if manifest["image_size"] != config.data.image_size:
    raise config_lib.ConfigError(f"{field}: {path} holds {manifest['image_size']} px images, the run trains on "
                                 f"config.data.image_size = {config.data.image_size}")
  if manifest["latents"]:
    kind = codecs.read_codec_metadata(path).get("codec", "vae")
    if config.data.codec != kind:
      raise config_lib.ConfigError(f"{field}: {path} holds {kind.upper()}-VAE latents; set config.data.codec = "
                                   f"{kind!r}")
    theirs = codecs.read_codec_metadata(path)
    if any(theirs.get(k) != codec.metadata.get(k) for k in _VAE_IDENTITY):
      raise config_lib.ConfigError(f"{field}: {path} was encoded with another VAE ({theirs.get('vae')}, step "
                                   f"{theirs.get('vae_step')}) than the run's ({codec.metadata['vae']}, step "
                                   f"{codec.metadata['vae_step']})")


def _read_manifest(name: str, path: str) -> dict:
  try:
    return prepared.read_manifest(path)
  except (FileNotFoundError, ValueError) as e:
    raise config_lib.ConfigError(f"config.data.mixture.{name}.path: {e}") from e


def _prepared_split(field: str, path: str, split: str) -> prepared.PreparedSource:
  try:
    return prepared.PreparedSource(path, split)
  except ValueError as e:
    raise config_lib.ConfigError(f"{field} = {split!r}: {e}") from e


def _prepared_data(config, workdir, codec) -> TrainingData:
  entries = {name: (e, _read_manifest(name, e.path)) for name, e in config.data.mixture.items()}
  for name, (entry, manifest) in entries.items():
    _check_prepared(config, name, manifest, entry.path, codec)
  inputs = {name: _prepared_split(f"config.data.mixture.{name}.split", e.path, e.split)
            for name, (e, _) in entries.items()}
  tokenized = {name: os.path.join(os.path.expanduser(e.path), run_dir.TOKENIZER_FILE)
               for name, (e, m) in entries.items() if m["kind"] == "text"}
  text_field = {"image_caption": "caption", "edit": "instruction"}

  def sample_texts():
    return [inputs[name][i][text_field[m["kind"]]].decode("utf-8") for name, (_, m) in entries.items()
            if m["kind"] in text_field for i in range(min(TOKENIZER_SAMPLE_CAPTIONS, len(inputs[name])))]

  tok = distributed.chief_first("tokenizer", lambda: run_tokenizer(config, workdir, sample_texts, tokenized))
  latents = _latents_fn(codec, pixels=any(m["kind"] != "text" and not m["latents"] for _, m in entries.values()))
  prepare_fns = {
      "text": lambda e: e["ids"],
      "image_caption": lambda e: (tok.encode(decode_caption(e)), latents(e)),
      "edit": lambda e: (latents(e, "input_"), tok.encode(e["instruction"].decode("utf-8")), latents(e, "output_")),
  }
  sources = [pipeline.Source(name, m["kind"], inputs[name], prepare_fns[m["kind"]], e.weight)
             for name, (e, m) in entries.items()]
  return TrainingData(tok, sources, sample_examples(config, codec))


class SampleImages:
  """Pixels and captions of a prepared split that may hold latents (decoded with the run's codec)."""

  def __init__(self, source, codec):
    self.source, self.codec = source, codec

  def __len__(self) -> int:
    return len(self.source)

  def __getitems__(self, indices) -> list[dict]:
    return [dict(caption=e["caption"], image=image_of(e, self.codec)) for e in self.source.__getitems__(indices)]


def sample_examples(config, codec):
  """The run's held-out images for samples and evaluation, random access {"caption": bytes, "image": uint8
  [S, S, 3]} (latents decoded with the codec), or None: without a mixture the shapes test split, else the
  data.sample_split of the first image-caption source that has one."""
  if not config.data.mixture:
    return distributed.chief_first("shapes test split", lambda: shapes.load_shapes(
        os.path.expanduser(config.data.data_dir), "test", config.data.image_size))
  for name, entry in config.data.mixture.items():
    manifest = _read_manifest(name, entry.path)
    if manifest["kind"] == "image_caption" and config.data.sample_split in manifest["splits"]:
      samples = _prepared_split("config.data.sample_split", entry.path, config.data.sample_split)
      wanted = max(config.sample.num_images, config.sample.num_captions)
      if len(samples) < wanted:
        raise config_lib.ConfigError(f"config.data.sample_split = {config.data.sample_split!r}: {entry.path} holds "
                                     f"{len(samples)} examples, the samples show {wanted}")
      return SampleImages(samples, codec)
  logging.warning("no image-caption source of config.data.mixture has a %r split: no samples are written",
                  config.data.sample_split)
  return None


def training_data(config, workdir: str, codec) -> TrainingData:
  """The run's tokenizer, weighted sources and sample images (see the module docstring)."""
  return _prepared_data(config, workdir, codec) if config.data.mixture else _builtin_data(config, workdir, codec)
