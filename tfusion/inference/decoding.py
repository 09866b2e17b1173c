"""Mixed-modal decoding (paper §3 "Inference"), batched, jit-compiled, with or without a KV cache.

Every row is one document that grows element by element. LM mode writes the last token into the
sequence and samples the next one. When the next token is BOI, the image phase writes BOI, appends n
patches of pure noise and denoises them step by step, each step overwriting the image block in place;
the finished image is written once more at t = sequence.CONTEXT_TIMESTEP (what later text attends to), EOI
becomes the next token and LM mode resumes.

Two memories run the same driver and give the same results:
  CachedMemory (a transformer.KVCache): a step computes only its block of new elements, against the
    cached keys and values of everything before and of its own block, under the model's mask (an
    image's patches see the whole image, or only earlier patches with model.image_attention = causal).
  FullMemory: the row's whole arrays; every step reruns the model over the whole sequence. It is the
    reference the cache is tested against and the baseline of benchmarks/sampling.py.

Shapes are static: one compilation per (batch, prompt length, options), none per token or step. Rows
run in lockstep phases: the text phase runs until every row has finished or is waiting to draw an
image, then the image phase draws all waiting rows' images at once. With classifier-free guidance
(cfg_scale != 1) each row has an unconditional partner that sees [BOS BOI image] only (the empty
caption of training's caption dropout); both predict eps and share the guided update. The partners
live in a memory of their own, n + 2 slots long: BOS is written once, and each image phase writes
BOI and the image over the previous ones. Text phases run the rows alone.

A model with discrete images (model.cfg.image_codes > 0, the Chameleon baseline) draws an image as n code
tokens instead (image_token_phase): sampled one by one with image_temperature and image_top_k from the code
logits alone, guided as l_u + w (l_c - l_u) by the same partners. Its images are code grids [h, w, 1]
(float32 holding the indices, as codecs.VqCodec reads them); text never draws a code.
"""
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from tfusion import diffusion, sharding
from tfusion.data import sequence
from tfusion.models import transformer



@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How tokens and images are drawn. Greedy text is temperature 0."""
  diffusion_steps: int = 250      # respaced from the T training timesteps
  sampler: str = "ddpm"           # ddpm (ancestral) | ddim
  ddim_eta: float = 0.0           # 0 = deterministic DDIM, 1 = the DDPM posterior variance
  cfg_scale: float = 1.0          # classifier-free guidance w in eps_u + w (eps_c - eps_u); 1 = off
  temperature: float = 0.0
  top_k: int = 0                  # 0 = off
  top_p: float = 1.0              # 1 = off
  max_new_tokens: int = 64        # text tokens generated per row (EOS included)
  max_images: int = 1             # images a row may generate (interleaved mode)
  clip_x0: float | None = None    # clip the x0 estimate to [-clip_x0, clip_x0] (the codec's range)
  image_temperature: float = 1.0  # discrete images: temperature of the code tokens (0 = greedy)
  image_top_k: int = 0            # discrete images: codes drawn among the k most likely (0 = all)

  def validate(self, num_timesteps: int) -> None:
    """ValueError naming the first bad option."""
    if self.sampler not in diffusion.SAMPLERS:
      raise ValueError(f"sampler {self.sampler!r} is unknown: use one of {diffusion.SAMPLERS}")
    if not 1 <= self.diffusion_steps <= num_timesteps:
      raise ValueError(f"diffusion_steps = {self.diffusion_steps} must be in [1, {num_timesteps}]")
    if not 0.0 <= self.ddim_eta <= 1.0:
      raise ValueError(f"ddim_eta = {self.ddim_eta} must be in [0, 1]")
    if self.cfg_scale < 0:
      raise ValueError(f"cfg_scale = {self.cfg_scale} must be >= 0")
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"temperature = {self.temperature}, top_k = {self.top_k} must be >= 0 and top_p = "
                       f"{self.top_p} in (0, 1]")
    if self.image_temperature < 0 or self.image_top_k < 0:
      raise ValueError(f"image_temperature = {self.image_temperature} and image_top_k = {self.image_top_k} must be "
                       ">= 0")
    if self.max_new_tokens < 0 or self.max_images < 0:
      raise ValueError(f"max_new_tokens = {self.max_new_tokens} and max_images = {self.max_images} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Task:
  """What the rows generate after their prompts: text (up to max_new_tokens, until EOS), images when
  the model draws BOI (allow_images), whether a row stops after its first image, and whether EOS may
  end the text before its first token (a caption is never empty)."""
  allow_text: bool
  allow_images: bool
  stop_after_image: bool
  nonempty_text: bool = False


TEXT = Task(allow_text=True, allow_images=False, stop_after_image=False)
# After [BOS BOI image EOI], training has both captions (image-first pairs) and EOS (caption-first pairs whose
# caption was dropped for CFG); a caption must not be that empty unconditional one.
CAPTION = Task(allow_text=True, allow_images=False, stop_after_image=False, nonempty_text=True)
IMAGE = Task(allow_text=False, allow_images=True, stop_after_image=True)
INTERLEAVED = Task(allow_text=True, allow_images=True, stop_after_image=False)


@dataclasses.dataclass
class Generation:
  """One row's output: generated text ids (EOS kept if drawn) and images, image k coming after the
  first image_positions[k] text ids."""
  tokens: list[int]
  images: np.ndarray              # [k, h, w, c] float32
  image_positions: list[int]


# ----------------------------------------------------------------------------------------------
# Memories: where the sequence so far lives. feed() writes a block and returns its outputs.
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class Elements:
  """Elements of every row in the model's input format: tokens, segment_ids, positions, image_ids
  [B, Q] int; latents [B, m, h, w, c] and timesteps [B, m] of the images among them."""
  tokens: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  image_ids: jax.Array
  latents: jax.Array
  timesteps: jax.Array


@flax.struct.dataclass
class Block(Elements):
  """New elements and where they go: slots [B, Q], the sequence slot of each element (out of range =
  not written; segment 0 marks elements of rows that sit this step out); image_slots [B, m], which of
  the row's images each block image is."""
  slots: jax.Array
  image_slots: jax.Array


@flax.struct.dataclass
class FullMemory(Elements):
  """The whole rows: element arrays [B, L] and image arrays [B, M, ...] (see data.sequence)."""

  @classmethod
  def empty(cls, batch, length, max_images, latent_shape, pad_id):
    ids = jnp.zeros((batch, length), jnp.int32)
    arrays = dict(tokens=jnp.full((batch, length), pad_id, jnp.int32), segment_ids=ids, positions=ids, image_ids=ids,
                  latents=jnp.zeros((batch, max_images, *latent_shape), jnp.float32),
                  timesteps=jnp.zeros((batch, max_images), jnp.int32))
    return cls(**jax.tree.map(_split_rows, arrays))

  @property
  def length(self) -> int:
    return self.tokens.shape[1]

  def feed(self, model, params, block: Block, with_logits: bool):
    def w(buf, val):
      return transformer.write_slots(buf, val, block.slots)

    def wi(buf, val):
      return transformer.write_slots(buf, val, block.image_slots)

    def gather(a, idx):
      return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[1] - 1).reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    memory = FullMemory(tokens=w(self.tokens, block.tokens), segment_ids=w(self.segment_ids, block.segment_ids),
                        positions=w(self.positions, block.positions), image_ids=w(self.image_ids, block.image_ids),
                        latents=wi(self.latents, block.latents), timesteps=wi(self.timesteps, block.timesteps))
    logits, eps = model.apply({"params": params}, memory.tokens, memory.segment_ids, memory.positions,
                              memory.image_ids, memory.latents, memory.timesteps, with_logits=with_logits)
    return (gather(logits, block.slots) if with_logits else None), gather(eps, block.image_slots), memory


@flax.struct.dataclass
class CachedMemory:
  cache: transformer.KVCache

  @classmethod
  def empty(cls, model, batch, length):
    cache = transformer.KVCache.empty(model.cfg.transformer, batch, length)
    return cls(cache.replace(segment_ids=_split_rows(cache.segment_ids), image_ids=_split_rows(cache.image_ids)))

  @property
  def length(self) -> int:
    return self.cache.length

  def feed(self, model, params, block: Block, with_logits: bool):
    logits, eps, cache = model.apply({"params": params}, block.tokens, block.segment_ids, block.positions,
                                     block.image_ids, block.latents, block.timesteps, self.cache, block.slots,
                                     with_logits=with_logits)
    return logits, eps, CachedMemory(cache)


# ----------------------------------------------------------------------------------------------
# The decoding state and the two phases.
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class DecodeState:
  """memory; partner: with guidance the unconditional partners' memory [B, n + 2] ([BOS BOI image]), else None;
  length [B]: elements written; last [B]: the next token, drawn but not yet written; done [B]; text [B, T] and
  num_text [B]: generated text ids; images [B, I, h, w, c], num_images [B] (prompt images included),
  image_positions [B, I]: num_text when each image was drawn; keys [B]."""
  memory: Any
  partner: Any
  length: jax.Array
  last: jax.Array
  done: jax.Array
  text: jax.Array
  num_text: jax.Array
  images: jax.Array
  num_images: jax.Array
  image_positions: jax.Array
  keys: jax.Array


@flax.struct.dataclass
class TextOptions:
  """The traced text sampling options (changing them does not recompile)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array


def sample_tokens(logits, keys, opts: TextOptions):
  """Next tokens [B] from logits [B, V] (banned ids at -inf): greedy at temperature 0, else sampled
  from the temperature-scaled distribution restricted to the top_k ids and the top_p nucleus."""
  def sample(logits):
    vocab = logits.shape[-1]
    scaled = logits / opts.temperature
    descending = -jnp.sort(-scaled, axis=-1)
    kth = descending[:, jnp.clip(opts.top_k, 1, vocab) - 1]
    scaled = jnp.where((opts.top_k > 0) & (scaled < kth[:, None]), -jnp.inf, scaled)
    descending = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass of the more likely ids
    cutoff = jnp.min(jnp.where(before < opts.top_p, descending, jnp.inf), axis=-1)
    scaled = jnp.where((opts.top_p < 1) & (scaled < cutoff[:, None]), -jnp.inf, scaled)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.lax.cond(opts.temperature > 0, sample, greedy, logits)


def _banned(vocab, special, task: Task, may_draw_image, first_token, image_codes: int = 0):
  """[B, V] bool: ids the LM may not draw. PAD, BOS and EOI never (EOI follows every image by rule), nor
  the last image_codes ids (discrete images' codes, drawn by the image phase); BOI only when images are allowed
  and the row has room for one; text ids when no text is asked; EOS as a row's first token (first_token [B]) when
  the task wants non-empty text."""
  ids = jnp.arange(vocab)
  never = (ids == special.pad) | (ids == special.bos) | (ids == special.eoi) | (ids >= vocab - image_codes)
  if not task.allow_text:
    never |= (ids != special.boi)
  banned = never[None, :] | (ids == special.boi)[None, :] & ~may_draw_image[:, None]
  if task.nonempty_text:
    banned |= (ids == special.eos)[None, :] & first_token[:, None]
  return banned


def _token_block(tokens, slots, write, memory_length: int, latent_shape) -> Block:
  """tokens [B] at slots [B] (their positions), written where write [B] is set, in a memory of memory_length
  slots."""
  batch = tokens.shape[0]
  no_images = jnp.zeros((batch, 0), jnp.int32)
  return Block(tokens=tokens[:, None], segment_ids=write[:, None].astype(jnp.int32), positions=slots[:, None],
               image_ids=jnp.zeros((batch, 1), jnp.int32), latents=jnp.zeros((batch, 0, *latent_shape), jnp.float32),
               timesteps=no_images, slots=jnp.where(write, slots, memory_length)[:, None], image_slots=no_images)


def _image_block(cfg, x, t, write, start, image_id, image_slot, memory_length: int, pad_id) -> Block:
  """Images x [B, h, w, c] at timestep t: their n patches at slots start [B] + [0, n), image ids image_id [B],
  image slots image_slot [B]; written where write [B] is set, in a memory of memory_length slots."""
  batch, n = write.shape[0], cfg.patches_per_image
  slots = start[:, None] + jnp.arange(n)
  return Block(tokens=jnp.full((batch, n), pad_id, jnp.int32),
               segment_ids=jnp.broadcast_to(write[:, None], (batch, n)).astype(jnp.int32), positions=slots,
               image_ids=jnp.broadcast_to(image_id[:, None], (batch, n)), latents=x[:, None],
               timesteps=jnp.full((batch, 1), t), slots=jnp.where(write[:, None], slots, memory_length),
               image_slots=jnp.where(write, image_slot, memory_length)[:, None])


def text_phase(model, params, state: DecodeState, opts: TextOptions, special, task: Task, image_budget):
  """LM steps until every row is done or waiting for an image (last == BOI). Rows whose text budget
  (T ids) is used up are done. image_budget [B]: images each row may still draw in total."""
  budget = state.text.shape[1]
  slots = state.memory.length

  def active(s):
    return ~s.done & (s.last != special.boi)

  def step(s):
    act = active(s)
    block = _token_block(s.last, s.length, act, slots, model.cfg.latent_shape)
    logits, _, memory = s.memory.feed(model, params, block, with_logits=True)
    room = s.length + 1 + model.cfg.patches_per_image + 2 <= slots
    banned = _banned(logits.shape[-1], special, task, (s.num_images < image_budget) & room, s.num_text == 0,
                     model.cfg.image_codes)
    logits = jnp.where(banned, -jnp.inf, logits[:, 0])
    keys = jax.vmap(jax.random.fold_in)(s.keys, s.length)
    token = sample_tokens(logits, keys, opts)
    is_text = act & (token != special.boi)
    text = transformer.write_slots(s.text, token[:, None], jnp.where(is_text, s.num_text, budget)[:, None])
    num_text = s.num_text + is_text
    done = s.done | (is_text & ((token == special.eos) | (num_text >= budget)))
    return s.replace(memory=memory, length=s.length + act, last=jnp.where(act, token, s.last), done=done, text=text,
                     num_text=num_text)

  return jax.lax.while_loop(lambda s: jnp.any(active(s)), step, state)


def image_phase(model, params, state: DecodeState, *, special, task: Task, alpha_bar, timesteps, sampler: str,
                ddim_eta, cfg_scale, clip_x0):
  """Draws an image for every row waiting at BOI (see the module docstring), guided when state.partner is set;
  others are untouched."""
  cfg = model.cfg
  batch, slots, partner = state.length.shape[0], state.memory.length, state.partner
  waiting = ~state.done & (state.last == special.boi)
  # A partner is [BOS BOI image] (BOS written by prefill): BOI at slot 1, then its image 1 (image slot 0).
  one, zero = jnp.ones(batch, jnp.int32), jnp.zeros(batch, jnp.int32)
  _, _, memory = state.memory.feed(model, params, _token_block(state.last, state.length, waiting, slots,
                                                               cfg.latent_shape), with_logits=False)
  if partner is not None:
    _, _, partner = partner.feed(model, params, _token_block(state.last, one, waiting, partner.length,
                                                             cfg.latent_shape), with_logits=False)

  start = state.length + 1

  def image_block(x, t):
    return _image_block(cfg, x, t, waiting, start, state.num_images + 1, state.num_images, slots, special.pad)

  def partner_block(x, t):
    return _image_block(cfg, x, t, waiting, one + 1, one, zero, partner.length, special.pad)

  image_keys = jax.vmap(jax.random.fold_in)(state.keys, 1_000_000 + state.num_images)
  x = jax.vmap(lambda k: jax.random.normal(k, cfg.latent_shape))(image_keys)

  def denoise(i, carry):
    x, memory, partner = carry
    t, t_prev = timesteps[i], timesteps[i + 1]
    _, output, memory = memory.feed(model, params, image_block(x, t), with_logits=False)
    output = output[:, 0]
    if partner is not None:
      _, unconditional, partner = partner.feed(model, params, partner_block(x, t), with_logits=False)
      output = diffusion.guide(output, unconditional[:, 0], cfg_scale)
    x0 = diffusion.x0_from_prediction(cfg.prediction, output, x, alpha_bar[t], clip_x0)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), cfg.latent_shape))(image_keys)
    if sampler == "ddim":
      x_prev = diffusion.ddim_step(x, x0, alpha_bar[t], alpha_bar[t_prev], noise, ddim_eta)
    else:
      x_prev = diffusion.ddpm_step(x, x0, alpha_bar[t], alpha_bar[t_prev], noise)
    return x_prev, memory, partner

  x, memory, partner = jax.lax.fori_loop(0, timesteps.shape[0] - 1, denoise, (x, memory, partner))
  if not task.stop_after_image:   # the finished image is context for what follows
    _, _, memory = memory.feed(model, params, image_block(x, sequence.CONTEXT_TIMESTEP), with_logits=False)

  images = transformer.write_slots(state.images, x[:, None],
                                   jnp.where(waiting, state.num_images, state.images.shape[1])[:, None])
  positions = transformer.write_slots(state.image_positions, state.num_text[:, None],
                                      jnp.where(waiting, state.num_images, state.images.shape[1])[:, None])
  length = jnp.where(waiting, start + cfg.patches_per_image, state.length)
  return state.replace(memory=memory, partner=partner, length=length, last=jnp.where(waiting, special.eoi, state.last),
                       done=state.done | (waiting & task.stop_after_image), images=images,
                       num_images=state.num_images + waiting, image_positions=positions)


def image_token_phase(model, params, state: DecodeState, opts: TextOptions, *, special, task: Task, cfg_scale):
  """Draws a discrete image for every row waiting at BOI: BOI and n code tokens, each sampled (opts: the image
  temperature and top-k) from the code logits, guided as l_u + cfg_scale (l_c - l_u) when state.partner is set
  (the partners write BOI and the codes after their BOS, at slots 1, 2, ...); EOI is the next token. Others are
  untouched."""
  cfg = model.cfg
  n, batch, offset = cfg.patches_per_image, state.length.shape[0], cfg.image_token_offset
  waiting = ~state.done & (state.last == special.boi)

  def draw(i, carry):
    s, codes = carry
    block = _token_block(s.last, s.length, waiting, s.memory.length, cfg.latent_shape)
    logits, _, memory = s.memory.feed(model, params, block, with_logits=True)
    logits, partner = logits[:, 0, offset:], s.partner
    if partner is not None:   # the partner's pending token is its row's: BOI, then the codes drawn
      block = _token_block(s.last, jnp.full(batch, 1 + i), waiting, partner.length, cfg.latent_shape)
      unconditional, _, partner = partner.feed(model, params, block, with_logits=True)
      unconditional = unconditional[:, 0, offset:]
      logits = unconditional + cfg_scale * (logits - unconditional)
    keys = jax.vmap(jax.random.fold_in)(s.keys, 2_000_000 + s.num_images * n + i)
    code = sample_tokens(logits, keys, opts)
    codes = codes.at[:, i].set(code)
    return s.replace(memory=memory, partner=partner, length=s.length + waiting,
                     last=jnp.where(waiting, code + offset, s.last)), codes

  state, codes = jax.lax.fori_loop(0, n, draw, (state, jnp.zeros((batch, n), jnp.int32)))
  if not task.stop_after_image:   # the last code is context for what follows
    block = _token_block(state.last, state.length, waiting, state.memory.length, cfg.latent_shape)
    _, _, memory = state.memory.feed(model, params, block, with_logits=False)
    state = state.replace(memory=memory, length=state.length + waiting)
  image = codes.reshape(batch, *cfg.latent_shape).astype(jnp.float32)
  slot = jnp.where(waiting, state.num_images, state.images.shape[1])[:, None]
  return state.replace(last=jnp.where(waiting, special.eoi, state.last),
                       done=state.done | (waiting & task.stop_after_image),
                       images=transformer.write_slots(state.images, image[:, None], slot),
                       image_positions=transformer.write_slots(state.image_positions, state.num_text[:, None], slot),
                       num_images=state.num_images + waiting)


def prefill(model, params, state: DecodeState, block: Block, bos):
  """Writes the prompts (block) and, with guidance, BOS (the id bos) at slot 0 of every partner."""
  _, _, memory = state.memory.feed(model, params, block, with_logits=False)
  partner = state.partner
  if partner is not None:
    batch = state.length.shape[0]
    first = _token_block(jnp.full(batch, bos), jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool), partner.length,
                         model.cfg.latent_shape)
    _, _, partner = partner.feed(model, params, first, with_logits=False)
  return state.replace(memory=memory, partner=partner)


# ----------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------
def _prompt_rows(prompts: list[list], special, cfg):
  """Pieces -> the prompt arrays of every row (data.sequence layout, one document per row), with the
  last element of each prompt held back as the row's first `last` token. Returns (arrays, lengths)."""
  def layout_of(n):
    return sequence.RowLayout(n, cfg.latent_shape, cfg.patch_size, discrete_images=cfg.image_codes > 0)
  lengths = [layout_of(1).document_length(p) for p in prompts]
  layout = layout_of(-(-max(lengths) // 16) * 16)
  rows = []
  for pieces in prompts:
    row = sequence.RowBuilder(layout, special, 0)
    row.add(pieces)
    rows.append(row.arrays())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, np.array(lengths, np.int32)


def decode(model, params, prompts: list[list], task: Task, special: sequence.SpecialIds, alpha_bar: np.ndarray,
           options: SamplingOptions, key: jax.Array, mesh=None, cached: bool = True,
           guided: bool | None = None) -> list[Generation]:
  """Generate after each prompt. A prompt is a list of sequence pieces (TextPiece, ImagePiece: clean
  latents, read at sequence.CONTEXT_TIMESTEP) starting with BOS and ending with a text token, the first one the
  model reads before drawing (for images only, end it with BOI). guided defaults to cfg_scale != 1."""
  num_timesteps = len(alpha_bar) - 1
  options.validate(num_timesteps)
  if not prompts:
    raise ValueError("no prompts to decode")
  for i, pieces in enumerate(prompts):
    if not pieces or not isinstance(pieces[0], sequence.TextPiece) or not len(pieces[0].ids) or \
        pieces[0].ids[0] != special.bos:
      raise ValueError(f"prompt {i} must start with a text piece beginning with BOS")
    ends_with_boi = isinstance(pieces[-1], sequence.TextPiece) and pieces[-1].ids[-1] == special.boi
    if ends_with_boi and (not task.allow_images or options.max_images < 1):
      raise ValueError(f"prompt {i} ends with BOI, but this task draws no images (max_images = "
                       f"{options.max_images})")
  guided = options.cfg_scale != 1.0 if guided is None else guided
  guided = guided and task.allow_images
  cfg = model.cfg
  mesh = mesh or _mesh_of(params)
  shards = sharding.data_shards(mesh)
  num_prompts = len(prompts)
  prompts = sharding.pad_rows(list(prompts), shards, prompts[0])   # whole rows per data shard
  arrays, lengths = _prompt_rows(prompts, special, cfg)
  batch, prompt_slots = arrays["tokens"].shape
  last = arrays["tokens"][np.arange(batch), lengths - 1]
  prompt_images = arrays["image_valid"].sum(axis=1).astype(np.int32)

  max_images = options.max_images if task.allow_images else 0
  text_budget = options.max_new_tokens if task.allow_text else 0
  total = prompt_slots + text_budget + max_images * (cfg.patches_per_image + 2) + 1   # static per prompt bucket
  image_capacity = arrays["latents"].shape[1] + max_images
  row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
  in_prompt = (np.arange(prompt_slots)[None, :] < (lengths - 1)[:, None])
  prompt_block = Block(
      tokens=arrays["tokens"], segment_ids=in_prompt.astype(np.int32), positions=arrays["positions"],
      image_ids=arrays["image_ids"], latents=arrays["latents"],
      timesteps=np.full(arrays["t_max"].shape, sequence.CONTEXT_TIMESTEP, np.int32),
      slots=np.where(in_prompt, np.arange(prompt_slots), total).astype(np.int32),
      image_slots=np.where(arrays["image_valid"], np.arange(arrays["image_valid"].shape[1]), image_capacity
                           ).astype(np.int32))
  image_budget = jnp.asarray(prompt_images + max_images)
  text_opts = TextOptions(jnp.float32(options.temperature), jnp.int32(options.top_k), jnp.float32(options.top_p))
  image_opts = TextOptions(jnp.float32(options.image_temperature), jnp.int32(options.image_top_k), jnp.float32(1.0))
  schedule = dict(alpha_bar=jnp.asarray(alpha_bar, jnp.float32),
                  timesteps=jnp.asarray(diffusion.respaced_timesteps(num_timesteps, options.diffusion_steps)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = _init_state(model, cached=cached, guided=guided, batch=batch, total=total, image_capacity=image_capacity,
                        pad=special.pad, length=jnp.asarray(lengths - 1), last=jnp.asarray(last),
                        text_budget=text_budget, keys=row_keys, prompt_images=jnp.asarray(prompt_images))
    state = _jit_prefill(model, params, state, prompt_block, special.bos)
    while True:  # the text phase leaves every row done or waiting at BOI
      state = _jit_text_phase(model, params, state, text_opts, special, task, image_budget)
      done, last = _host((state.done, state.last))
      if not np.any(~done & (last == special.boi)):
        break
      if cfg.image_codes:
        state = _jit_image_token_phase(model, params, state, image_opts, special=special, task=task,
                                       cfg_scale=jnp.float32(options.cfg_scale))
        continue
      state = _jit_image_phase(model, params, state, special=special, task=task, alpha_bar=schedule["alpha_bar"],
                               timesteps=schedule["timesteps"], sampler=options.sampler,
                               ddim_eta=jnp.float32(options.ddim_eta), cfg_scale=jnp.float32(options.cfg_scale),
                               clip_x0=options.clip_x0)
  text, num_text, images, num_images, positions = _host(
      (state.text, state.num_text, state.images, state.num_images, state.image_positions))
  results = []
  for r in range(num_prompts):
    first = prompt_images[r]
    results.append(Generation(tokens=text[r, :num_text[r]].tolist(), images=images[r, first:num_images[r]],
                              image_positions=positions[r, first:num_images[r]].tolist()))
  return results


def _mesh_of(params):
  """The mesh the params are laid out on, or one device's."""
  leaf = jax.tree.leaves(params)[0]
  if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
    return leaf.sharding.mesh
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def _host(tree):
  return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


@functools.partial(jax.jit, static_argnames=("model", "cached", "guided", "batch", "total", "image_capacity", "pad",
                                             "text_budget"))
def _init_state(model, *, cached, guided, batch, total, image_capacity, pad, length, last, text_budget, keys,
                prompt_images):
  cfg = model.cfg

  def empty(length, images):
    if cached:
      return CachedMemory.empty(model, batch, length)
    return FullMemory.empty(batch, length, 0 if cfg.image_codes else images, cfg.latent_shape, pad)  # codes are tokens

  partner = empty(cfg.patches_per_image + 2, 1) if guided else None     # [BOS BOI image]
  zeros = jnp.zeros(batch, jnp.int32)
  rows = dict(length=length, last=last, done=jnp.zeros(batch, bool), text=jnp.full((batch, text_budget), pad),
              num_text=zeros, images=jnp.zeros((batch, image_capacity, *cfg.latent_shape), jnp.float32),
              num_images=prompt_images, image_positions=jnp.zeros((batch, image_capacity), jnp.int32), keys=keys)
  return DecodeState(memory=empty(total, image_capacity), partner=partner, **jax.tree.map(_split_rows, rows))


def _split_rows(a):
  """a [B, ...] split by rows over the data shards, as every phase leaves it (else the first call of a phase gets
  other input shardings than the next ones, and compiles twice)."""
  return nn.with_logical_constraint(a, ("batch",) + (None,) * (a.ndim - 1))


_jit_prefill = jax.jit(prefill, static_argnames=("model",), donate_argnames=("state",))
_jit_text_phase = jax.jit(text_phase, static_argnames=("model", "special", "task"), donate_argnames=("state",))
_jit_image_token_phase = jax.jit(image_token_phase, static_argnames=("model", "special", "task"),
                                 donate_argnames=("state",))
_jit_image_phase = jax.jit(image_phase, static_argnames=("model", "special", "task", "sampler", "clip_x0"),
                           donate_argnames=("state",))
