"""The evaluation suite of a checkpoint (python -m tfusion.evaluate, and every eval_every steps of training).

  text perplexity   token-level, on the held-out documents (every text target of [BOS doc EOS], documents
                    packed into seq_len rows as in training)
  image loss        the eps MSE of held-out caption-first image documents at t = 100, 300, ..., 900 with fixed
                    noise (the training objective, measured without sampling); with discrete images (the vq
                    codec) the mean negative log-likelihood per code token of those documents' images instead
  image-to-text     greedy captions of held-out images: CIDEr-D against their captions, and on the shapes
                    data the analytic checker's exact match and per-attribute accuracy
  text-to-image     images from held-out captions: on the shapes data scored by the analytic checker; FID
                    against the held-out images with config.eval_inception_weights, CLIP score against the
                    captions with config.eval_clip (user-supplied weights; see evaluation/inception.py, clip.py)

FID here is over eval_examples images on each side (64 by default): strongly biased upwards at such counts, so
compare runs at equal counts only; the paper's protocol is 30K COCO prompts.

The report goes to <workdir>/eval/step_<N>.json; process 0 writes it.
"""
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfusion import config as config_lib, diffusion, distributed, objective, run_dir, sharding
from tfusion.data import mixture, pipeline, prepared, sequence, text_corpus
from tfusion.evaluation import clip as clip_lib, inception, metrics, shapes_checker
from tfusion.inference import sampler as sampler_lib


IMAGE_LOSS_TIMESTEPS = (100, 300, 500, 700, 900, 990)


def held_out_documents(config, tokenizer) -> list[np.ndarray]:
  """Token ids of the text documents the run holds out: with a mixture, the data.sample_split of its prepared
  text sources; else data.text_test_fraction of the text source."""
  if config.data.mixture:
    docs = []
    for entry in config.data.mixture.values():
      manifest = prepared.read_manifest(entry.path)
      if manifest["kind"] == "text" and config.data.sample_split in manifest["splits"]:
        source = prepared.PreparedSource(entry.path, config.data.sample_split)
        docs += [np.asarray(source[i]["ids"], np.int32) for i in range(len(source))]
    return docs
  documents = text_corpus.load_text_documents(config.data.text_source)
  _, test = text_corpus.split_documents(documents, config.data.text_test_fraction, config.seed)
  return [np.array(tokenizer.encode(d), np.int32) for d in test]


def text_rows(documents, layout: sequence.RowLayout, special: sequence.SpecialIds, num_timesteps: int) -> list[dict]:
  """[BOS doc EOS] documents packed in order into rows; a document longer than the room continues in the next
  row."""
  rows, row = [], sequence.RowBuilder(layout, special, num_timesteps)
  for ids in documents:
    pieces = sequence.text_document(ids, special)
    while pieces:
      if row.room == 0:
        rows.append(row.arrays())
        row = sequence.RowBuilder(layout, special, num_timesteps)
      head = sequence.longest_prefix(layout, pieces, row.room, row.image_room)
      row.add(head)
      pieces = sequence.drop_elements(layout, pieces, layout.document_length(head))
  if row.length:
    rows.append(row.arrays())
  return rows


def whole_document_rows(documents, layout: sequence.RowLayout, special: sequence.SpecialIds,
                        num_timesteps: int) -> list[dict]:
  """Documents (lists of pieces, each fitting one row) packed whole and in order into rows."""
  rows, row = [], sequence.RowBuilder(layout, special, num_timesteps)
  for pieces in documents:
    if not row.fits(pieces):
      rows.append(row.arrays())
      row = sequence.RowBuilder(layout, special, num_timesteps)
    row.add(pieces)
  return rows + [row.arrays()]


def _row_batches(mesh, rows: list[dict], rows_per_batch: int):
  """(index of the first row, batch) for rows_per_batch rows at a time (rounded up to a multiple of the mesh's
  batch shards, the last batch padded with empty rows), each batch placed on the mesh."""
  shards = sharding.data_shards(mesh)
  rows_per_batch = -(-rows_per_batch // shards) * shards
  empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
  for start in range(0, len(rows), rows_per_batch):
    part = rows[start:start + rows_per_batch]
    part = sharding.pad_rows(part, rows_per_batch, empty)
    yield start, jax.device_put({k: np.stack([r[k] for r in part]) for k in part[0]}, sharding.batch_sharding(mesh))


@functools.partial(jax.jit, static_argnames="model")
def _token_losses(model, params, batch):
  """Per-position cross-entropy [B, L] of the next token."""
  logits, _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                          batch["image_ids"], batch["latents"], batch["t_max"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, objective.text_targets(batch["tokens"]))


@functools.partial(jax.jit, static_argnames="model")
def _text_loss(model, params, batch):
  """(summed cross-entropy over the text targets, their number)."""
  return (_token_losses(model, params, batch) * batch["text_loss_mask"]).sum(), batch["text_loss_mask"].sum()


def text_perplexity(sampler: sampler_lib.Sampler, documents, rows_per_batch: int = 8) -> dict:
  """Token-level perplexity of `documents` (token ids) under the sampler's model."""
  if not documents:
    return {}
  rows = text_rows(documents, sampler.spec.layout, sampler.special, sampler.spec.num_timesteps)
  loss_sum, targets = 0.0, 0
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sharding.RULES):
    for _, batch in _row_batches(sampler.mesh, rows, rows_per_batch):
      s, n = jax.device_get(_text_loss(sampler.model, sampler.params, batch))
      loss_sum, targets = loss_sum + float(s), targets + int(n)
  return dict(perplexity=metrics.perplexity(loss_sum, targets), text_targets=targets, documents=len(documents))


@functools.partial(jax.jit, static_argnames="model")
def _image_loss(model, params, batch, t, eps, alpha_bar):
  """(summed per-image eps MSE over the real images, their number) at timesteps t [B, M]; a v decoder's eps
  estimate is derived from its v."""
  _, output, x_t = objective.forward(params, batch, t, eps, model=model, alpha_bar=alpha_bar)
  eps_hat = diffusion.eps_from_prediction(model.cfg.prediction, output, x_t, alpha_bar[t])
  per_image = jnp.mean(jnp.square(eps_hat - eps), axis=(2, 3, 4))
  return (per_image * batch["image_valid"]).sum(), batch["image_valid"].sum()


@jax.jit
def reference_eps(x_t, alpha_bar_t, train_latents):
  """eps estimates of two reference denoisers at noise level alpha_bar_t (a scalar), for x_t [N, h, w, c]:
  the mean training image as x0, and the ideal denoiser of the training set, whose x0 is the posterior mean
  over train_latents [K, h, w, c] (the exact minimiser of the training loss on that set). -> (mean, ideal)."""
  x = x_t.reshape(x_t.shape[0], -1)
  train = train_latents.reshape(train_latents.shape[0], -1)
  root_a, var = jnp.sqrt(alpha_bar_t), 1.0 - alpha_bar_t
  distances = (jnp.sum(x * x, 1, keepdims=True) - 2 * root_a * x @ train.T + alpha_bar_t * jnp.sum(train * train, 1))
  x0_ideal = jax.nn.softmax(-distances / (2 * var), axis=-1) @ train
  x0_mean = jnp.mean(train, axis=0, keepdims=True)

  def to_eps(x0):
    return ((x - root_a * x0) / jnp.sqrt(var)).reshape(x_t.shape)
  return to_eps(x0_mean), to_eps(x0_ideal)


def held_out_image_loss(sampler: sampler_lib.Sampler, examples: list[dict], key, timesteps=IMAGE_LOSS_TIMESTEPS,
                        rows_per_batch: int = 8, train_latents: np.ndarray | None = None) -> dict:
  """The eps MSE of held-out [BOS caption (image) EOS] documents (the paper's training objective), at each of
  `timesteps` with noise fixed by `key` (the same for every t and every run given the key): a low-variance image
  metric for runs whose samples are not yet judged by FID or the checker. -> {"eps_mse": mean over t,
  "eps_mse_t<t>"}; with train_latents [K, h, w, c] also the reference_eps denoisers' "mean_image_eps_mse_t<t>"
  and "ideal_eps_mse_t<t>" on the same noisy images."""
  tok, special, num_timesteps = sampler.tokenizer, sampler.special, sampler.spec.num_timesteps
  latents = sampler.encode_images(np.stack([e["image"] for e in examples]))
  documents = [sequence.image_caption_document(tok.encode(e["caption"].decode("utf-8")), x, True, special,
                                               num_timesteps, num_timesteps)
               for e, x in zip(examples, latents)]
  rows = whole_document_rows(documents, sampler.spec.layout, special, num_timesteps)
  names = ["eps_mse"] + ([] if train_latents is None else ["mean_image_eps_mse", "ideal_eps_mse"])
  sums = {(name, t): 0.0 for name in names for t in timesteps}
  count = 0
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sharding.RULES):
    for start, batch in _row_batches(sampler.mesh, rows, rows_per_batch):
      eps = jax.random.normal(jax.random.fold_in(key, start), batch["latents"].shape, jnp.float32)
      valid = np.asarray(batch["image_valid"])
      count += int(valid.sum())
      for t in timesteps:
        s, _ = jax.device_get(_image_loss(sampler.model, sampler.params, batch, jnp.full(batch["t_max"].shape, t), eps,
                                          sampler.alpha_bar))
        sums["eps_mse", t] += float(s)
        if train_latents is not None:
          clean, noise = np.asarray(batch["latents"])[valid], np.asarray(eps)[valid]
          x_t = diffusion.q_sample(clean, noise, np.full(len(clean), sampler.alpha_bar[t], np.float32))
          for name, eps_hat in zip(names[1:], reference_eps(x_t, np.float32(sampler.alpha_bar[t]), train_latents)):
            sums[name, t] += float(jnp.sum(jnp.mean(jnp.square(eps_hat - noise), axis=(1, 2, 3))))
  report = {f"{name}_t{t}": total / count for (name, t), total in sums.items()}
  return dict(eps_mse=float(np.mean([report[f"eps_mse_t{t}"] for t in timesteps])), **report)


def held_out_code_loss(sampler: sampler_lib.Sampler, examples: list[dict], rows_per_batch: int = 8) -> dict:
  """Discrete images: the mean cross-entropy (nats) of the code tokens of held-out [BOS caption BOI codes EOI EOS]
  documents, each code predicted from the caption and the codes before it. -> {"code_nll", "codes"}."""
  special, offset = sampler.special, sampler.model.cfg.image_token_offset
  codes = sampler.encode_images(np.stack([e["image"] for e in examples]))
  documents = [sequence.discrete_image_caption_document(sampler.tokenizer.encode(e["caption"].decode("utf-8")), c,
                                                        True, special, offset) for e, c in zip(examples, codes)]
  rows = whole_document_rows(documents, sampler.spec.layout, special, sampler.spec.num_timesteps)
  total, count = 0.0, 0
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sharding.RULES):
    for _, batch in _row_batches(sampler.mesh, rows, rows_per_batch):
      ce = np.asarray(jax.device_get(_token_losses(sampler.model, sampler.params, batch)))
      is_code = np.asarray(objective.text_targets(batch["tokens"])) >= offset
      targets = is_code & np.asarray(batch["text_loss_mask"])
      total, count = total + float(ce[targets].sum()), count + int(targets.sum())
  return dict(code_nll=total / count, codes=count)


def caption_report(sampler: sampler_lib.Sampler, examples: list[dict], options, key) -> dict:
  """CIDEr-D of greedy captions against each image's caption, plus the checker's scores on shapes."""
  images = np.stack([e["image"] for e in examples])
  truths = [e["caption"].decode("utf-8") for e in examples]
  captions = sampler.caption(images, options, key)
  report = dict(cider=metrics.cider_d(captions, [[t] for t in truths])[0], examples=len(examples))
  scenes = [shapes_checker.parse_caption(t) for t in truths]
  if all(scenes):
    checks = shapes_checker.accuracy([shapes_checker.check_caption(c, s) for c, s in zip(captions, scenes)])
    report.update({f"shapes_{k}": v for k, v in checks.items()})
  report["samples"] = [dict(truth=t, model=c) for t, c in zip(truths[:8], captions[:8])]
  return report


@dataclasses.dataclass(frozen=True, eq=False)
class ImageScorers:
  """The networks of the weight-file metrics: FID Inception params (on the default device) and a CLIP model,
  each None when not given."""
  inception_params: dict | None = None
  clip: clip_lib.Clip | None = None

  @classmethod
  def from_config(cls, config) -> "ImageScorers":
    """Loads config.eval_inception_weights and config.eval_clip; a file that fails to load (missing, corrupt,
    wrong keys) raises a ConfigError naming the field."""
    def load(field, loader):
      path = os.path.expanduser(config[field])
      if not path:
        return None
      try:
        return loader(path)
      except Exception as e:  # safetensors and tokenizers raise their own exception types for corrupt files
        raise config_lib.ConfigError(f"config.{field}: cannot load {path}: {e}") from e
    inception_params = load("eval_inception_weights", inception.load_inception_params)
    return cls(None if inception_params is None else jax.device_put(inception_params),
               load("eval_clip", clip_lib.load_clip))


def image_report(sampler: sampler_lib.Sampler, examples: list[dict], options, key,
                 scorers: ImageScorers = ImageScorers()) -> dict:
  """Images generated from the examples' captions: on the shapes data the checker's per-attribute accuracy (and
  its score on the true images), FID against the examples' images and CLIP score against the captions when the
  scorers have weights. examples: [{"image": uint8 [S, S, 3], "caption": bytes}]; for a source that stores
  only latents the examples' images are VAE reconstructions, so its FID is not comparable with a pixel
  source's."""
  truths = [e["caption"].decode("utf-8") for e in examples]
  scenes = [shapes_checker.parse_caption(t) for t in truths]
  if not all(scenes) and scorers.inception_params is None and scorers.clip is None:
    return {}
  images = sampler.text_to_image(truths, options, key)
  report = dict(examples=len(examples))
  if all(scenes):
    checks = [shapes_checker.check_image(image, scene) for image, scene in zip(images, scenes)]
    reference = [shapes_checker.check_image(e["image"], s) for e, s in zip(examples, scenes)]
    report.update({f"shapes_{k}": v for k, v in shapes_checker.accuracy(checks).items()},
                  reference_all=shapes_checker.accuracy(reference)["all"])
  if scorers.inception_params is not None:
    real = np.stack([e["image"] for e in examples])
    report["fid"] = metrics.feature_frechet_distance(
        *(inception.inception_features(scorers.inception_params, x) for x in (np.asarray(images), real)))
  if scorers.clip is not None:
    report["clip_score"] = metrics.clip_score(scorers.clip.embed_images(np.asarray(images)),
                                              scorers.clip.embed_texts(truths))
  return report


def evaluate(sampler: sampler_lib.Sampler, test_examples, step: int, num_examples: int = 64, seed: int = 0,
             scorers: ImageScorers = ImageScorers(), train_latents: np.ndarray | None = None) -> dict:
  """The report of one checkpoint (see the module docstring); test_examples: random access
  {"image": uint8 [S, S, 3], "caption": bytes}; train_latents [K, h, w, c]: the reference denoisers' training set
  (see held_out_image_loss), e.g. reference_latents(config, codec)."""
  config = sampler.config
  examples = pipeline.take(test_examples, num_examples)
  options = sampler.spec.sampling
  key = jax.random.fold_in(jax.random.key(seed), step)
  caption_key, image_key = jax.random.split(key)
  return dict(step=step, weights=sampler.weights,
              text=text_perplexity(sampler, held_out_documents(config, sampler.tokenizer)),
              image_loss=(held_out_code_loss(sampler, examples) if sampler.discrete_images else
                          held_out_image_loss(sampler, examples, jax.random.key(seed), train_latents=train_latents)),
              image_to_text=caption_report(sampler, examples, options, caption_key),
              text_to_image=image_report(sampler, examples, options, image_key, scorers))


REFERENCE_TRAIN_IMAGES = 20_000   # the first training images the reference denoisers know (shapes: all of them)


def reference_latents(config, codec) -> np.ndarray | None:
  """Latents of the first REFERENCE_TRAIN_IMAGES training images, on the default device (or None)."""
  latents = mixture.train_image_latents(config, codec, REFERENCE_TRAIN_IMAGES)
  return None if latents is None else jax.device_put(latents)


def write_report(workdir: str, report: dict) -> str:
  """Process 0 writes the report to <workdir>/eval/step_<N>.json; returns the path."""
  path = run_dir.RunDir(workdir).eval_report(report["step"])
  if distributed.is_chief():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
  return path


def scalars(report: dict) -> dict[str, float]:
  """The report's numbers as flat eval/<group>/<name> metrics."""
  return {f"eval/{group}/{name}": float(value) for group, values in report.items() if isinstance(values, dict)
          for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
