"""Transfusion decoding for the training loop's samples: text -> image and image -> caption.

Both run the full model on the whole sequence at every step (no KV cache yet): an image is
denoised in place inside [BOS caption BOI (n patches) EOI] under the Transfusion mask, and a
caption is decoded greedily after [BOS BOI (n clean patches, t = 0) EOI].
"""
import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from tfusion import diffusion
from tfusion.data import sequence


def _stack_rows(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _single_document_rows(documents, layout_for_length, special, num_timesteps) -> dict:
  """One row per document, all padded to the longest one."""
  length = max(layout_for_length(0).document_length(d) for d in documents)
  layout = layout_for_length(length)
  rows = []
  for pieces in documents:
    row = sequence.RowBuilder(layout, special, num_timesteps)
    row.add(pieces)
    rows.append(row.arrays())
  return _stack_rows(rows)


@functools.partial(jax.jit, static_argnames=("model", "clip_x0"))
def _denoise(model, params, rows, x_start, timesteps, alpha_bar, key, clip_x0):
  """Ancestral DDPM over the respaced `timesteps` [K + 1]; x_start: [N, 1, h, w, c] pure noise."""
  def body(i, x):
    t, t_prev = timesteps[i], timesteps[i + 1]
    _, eps_hat = model.apply({"params": params}, rows["tokens"], rows["segment_ids"], rows["positions"],
                             rows["image_ids"], x, jnp.full(x.shape[:2], t))
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape)
    return diffusion.ddpm_step(x, eps_hat, alpha_bar[t], alpha_bar[t_prev], noise, clip_x0)
  return jax.lax.fori_loop(0, timesteps.shape[0] - 1, body, x_start)


def generate_images(model, params, captions: list[list[int]], special: sequence.SpecialIds,
                    alpha_bar: np.ndarray, num_steps: int, key: jax.Array,
                    clip_x0: float | None = None) -> np.ndarray:
  """Latents for each caption (token ids without BOS/EOS): [N, h, w, c] float32."""
  cfg = model.cfg
  num_timesteps = len(alpha_bar) - 1
  placeholder = np.zeros(cfg.latent_shape, np.float32)
  documents = [sequence.image_caption_document(c, placeholder, True, special, num_timesteps, num_timesteps)
               for c in captions]
  rows = _single_document_rows(
      documents, lambda n: sequence.RowLayout(max(n, 1), cfg.latent_shape, cfg.patch_size), special,
      num_timesteps)
  rows = {k: rows[k] for k in ("tokens", "segment_ids", "positions", "image_ids")}
  x_start = jax.random.normal(key, (len(captions), 1, *cfg.latent_shape))
  timesteps = diffusion.respaced_timesteps(num_timesteps, num_steps)
  latents = _denoise(model, params, rows, x_start, jnp.asarray(timesteps), jnp.asarray(alpha_bar, jnp.float32),
                     jax.random.fold_in(key, 1), clip_x0)
  return multihost_utils.process_allgather(latents[:, 0], tiled=True)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens"))
def _greedy_decode(model, params, rows, latents, start, num_tokens):
  """Greedy tokens written at positions start, start + 1, ...; returns the updated tokens [N, L]."""
  timesteps = jnp.zeros(latents.shape[:2], jnp.int32)

  def body(i, tokens):
    logits, _ = model.apply({"params": params}, tokens, rows["segment_ids"], rows["positions"],
                            rows["image_ids"], latents, timesteps)
    next_token = jnp.argmax(logits[:, start + i - 1], axis=-1).astype(tokens.dtype)
    return tokens.at[:, start + i].set(next_token)
  return jax.lax.fori_loop(0, num_tokens, body, rows["tokens"])


def generate_captions(model, params, latents: np.ndarray, special: sequence.SpecialIds,
                      max_tokens: int) -> list[list[int]]:
  """Greedy captions (ids, cut at EOS) for clean latents [N, h, w, c] seen at t = 0."""
  cfg = model.cfg
  documents = [[sequence.TextPiece(np.array([special.bos], np.int32)), sequence.ImagePiece(lat, 0)]
               for lat in latents]
  prefix = cfg.patches_per_image + 3
  layout = sequence.RowLayout(prefix + max_tokens, cfg.latent_shape, cfg.patch_size)
  rows = []
  for pieces in documents:
    row = sequence.RowBuilder(layout, special, 0)
    row.add(pieces)
    row.segment_ids[:] = 1                        # the slots to be generated belong to the document
    row.positions[:] = np.arange(layout.seq_len)
    rows.append(row.arrays())
  rows = _stack_rows(rows)
  tokens = _greedy_decode(model, params, {k: rows[k] for k in ("tokens", "segment_ids", "positions", "image_ids")},
                          jnp.asarray(rows["latents"]), prefix, max_tokens)
  captions = []
  for ids in multihost_utils.process_allgather(tokens[:, prefix:], tiled=True).tolist():
    captions.append(ids[:ids.index(special.eos)] if special.eos in ids else ids)
  return captions
