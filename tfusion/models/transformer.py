"""Llama-style decoder stack: RMSNorm, RoPE, SwiGLU, pre-norm residual blocks, scanned layers.

Chameleon's stability changes (arXiv 2405.09818 §2.3; the Transfusion paper's Chameleon baseline adds them) are
options, off by default: qk_norm (RMSNorm of each head's queries and keys before RoPE) and
norm_placement = "branch_output" (the block's norms on its branch outputs, h = x + norm(attn(x))).

Parameters carry logical axis names (embed, heads, kv, mlp, layers) and key activations are
constrained to (batch, length, act_*) names; `tfusion.sharding` maps both to the device mesh.

For decoding, the stack also runs on a block of new elements against a KVCache: the block's keys
and values are written into their cache slots, and its queries attend to the whole cache under the
same Transfusion mask (causality comes from the slot indices).
"""
import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tfusion import masks
from tfusion.models import contraction, flash_attention


ATTENTIONS = ("dense", "chunked", "dot_product", "flash")
IMAGE_ATTENTIONS = ("bidirectional", "causal")
NORM_PLACEMENTS = ("pre", "branch_output")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "dense"       # dense | chunked | dot_product | flash (Pallas TPU kernel)
  attention_chunk: int = 512     # block length of chunked and flash attention
  image_attention: str = "bidirectional"  # bidirectional | causal (patches of one image in raster order)
  unroll_layers: bool = False    # straight-line layers instead of a loop (XLA's cost analysis prices a loop body once)
  qk_norm: bool = False          # RMSNorm of each head's queries and keys over the head dim, before RoPE (Chameleon)
  norm_placement: str = "pre"    # pre: x + f(norm(x)) (Llama) | branch_output: x + norm(f(x)) (Chameleon, Swin v2)

  def __post_init__(self):
    if self.image_attention not in IMAGE_ATTENTIONS:
      raise ValueError(f"image_attention must be one of {IMAGE_ATTENTIONS}, got {self.image_attention!r}")
    if self.norm_placement not in NORM_PLACEMENTS:
      raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


class Projection(nn.Module):
  """A bias-free linear map with an explicit multi-axis kernel: einsum(x, kernel).

  `spec` is the einsum of input and kernel, e.g. "bld,dhk->blhk"; `shape` the kernel shape and
  `axes` its logical axis names; `fan_in_axes` the kernel axes summed over (for the init scale).
  """
  spec: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  fan_in_axes: tuple[int, ...]
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    fan_out = tuple(i for i in range(len(self.shape)) if i not in self.fan_in_axes)
    init = nn.initializers.lecun_normal(in_axis=self.fan_in_axes, out_axis=fan_out)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape, self.param_dtype)
    # Accumulate in float32 whatever the compute dtype (free on TPU/GPU; 2x faster bf16 on CPU).
    return contraction.project(self.spec, x.astype(self.dtype), kernel.astype(self.dtype)).astype(self.dtype)


def _projection(cfg, name, spec, shape, axes, fan_in_axes=(0,)):
  return Projection(spec, shape, axes, fan_in_axes, cfg.dtype, cfg.param_dtype, name=name)


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis.  x: [..., D]; scale: [D], logical axis `axis`; computed in float32."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  axis: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x, positions, theta):
  """Rotary embedding on the last axis (split halves).  x: [B, L, H, Dh]; positions: [B, L] int."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs          # [B, L, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_over(q, q_ids, parts, bidirectional_images=True):
  """Softmax attention of the queries over one or more key sets at once (one softmax across all of
  them), under the Transfusion mask; logits and softmax in float32.

  q: [B, Q, H, Dh]; q_ids = (segment_ids [B, Q], image_ids [B, Q], index [Q] or [B, Q]);
  parts: [(k, v, k_ids)] with k, v: [B, K, H, Dh] and k_ids like q_ids over the K keys -> [B, Q, H, Dh].
  """
  logits = []
  for k, _, k_ids in parts:
    mask = masks.mask_block(*q_ids, *k_ids, bidirectional_images)
    part = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    part = part / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    logits.append(jnp.where(mask[:, None, :, :], part, jnp.finfo(jnp.float32).min))
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  out, offset = 0.0, 0
  for k, v, _ in parts:
    p = probs[..., offset:offset + k.shape[1]].astype(v.dtype)
    out = out + jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32)
    offset += k.shape[1]
  return out.astype(parts[0][1].dtype)


def dense_attention(q, k, v, q_ids, k_ids, bidirectional_images=True):
  """attention_over one key set.  q: [B, Q, H, Dh]; k, v: [B, K, H, Dh] -> [B, Q, H, Dh]."""
  return attention_over(q, q_ids, [(k, v, k_ids)], bidirectional_images)


def chunked_attention(q, q_ids, parts, chunk, bidirectional_images=True):
  """attention_over one block of `chunk` queries at a time, each block rematerialised in the
  backward pass: logits memory is [B, H, chunk, K] instead of [B, H, Q, K]. Same result.

  A query length that is not a multiple of `chunk` (e.g. a prompt at sampling time) is padded with
  padding queries, whose outputs are dropped.
  """
  batch, length, heads, head_dim = q.shape
  blocks = -(-length // chunk)
  pad = blocks * chunk - length
  segment_ids, image_ids, index = q_ids
  index = jnp.broadcast_to(index, segment_ids.shape)
  pad_rows = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
  split = lambda a: jnp.moveaxis(a.reshape(batch, blocks, chunk, *a.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def block(args):
    q_block, *q_block_ids = args
    return attention_over(q_block, q_block_ids, parts, bidirectional_images)

  out = jax.lax.map(block, tuple(split(pad_rows(a)) for a in (q, segment_ids, image_ids, index)))
  return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * chunk, heads, head_dim)[:, :length]


# The output and log-sum-exp of the blockwise attentions (chunked, flash), for remat policies: their custom
# gradients are opaque to the dots policy, which would otherwise rerun the whole forward pass.
ATTENTION_NAME = flash_attention.OUTPUT_NAME


def block_skipping_attention(q, k, v, segment_ids, image_ids, chunk, bidirectional_images=True):
  """Self-attention of a row's L elements (training), `chunk` queries at a time against `chunk` keys at a
  time with an online softmax, computing only the key blocks masks.key_block_ranges marks visible to some
  row of the batch: the others (later text, other documents) cost nothing, forward or backward. Same values
  and gradients as dense_attention.

  The gradient is FlashAttention's: the forward pass keeps each query's log-sum-exp, and the backward pass
  recomputes each visible block's probabilities from it, so no [L, L] array is stored or rematerialised
  whole, and the softmax gradient is one elementwise step (p * (dp - rowsum(dout * out))).

  q, k, v: [B, L, H, Dh]; segment_ids, image_ids: [B, L] int -> [B, L, H, Dh]. A length that is not a
  multiple of chunk is padded with padding elements (segment 0), whose outputs are dropped.
  """
  length = q.shape[1]
  n = -(-length // chunk)
  if n * chunk != length:
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    out = block_skipping_attention(*map(pad, (q, k, v, segment_ids, image_ids)), chunk, bidirectional_images)
    return out[:, :length]
  visible = masks.visible_block_pairs(segment_ids, image_ids, chunk, bidirectional_images)   # [n, n]
  heads_first = lambda a: jnp.moveaxis(a, 2, 1)               # noqa: E731  [B, H, L, Dh]: one matmul per head
  out = _block_attention(heads_first(q), heads_first(k), heads_first(v), segment_ids, image_ids, visible, chunk,
                         bidirectional_images)
  return jnp.moveaxis(out, 1, 2)


def _blocks(a, chunk):
  """[B, H, L, ...] -> the L / chunk blocks [B, H, chunk, ...] along L (separate arrays, so that a gradient
  accumulates per block)."""
  return jnp.split(a, a.shape[2] // chunk, axis=2)


def _block_logits(q_i, k_j, ids_i, ids_j, bidirectional_images):
  """Scaled, masked logits of a query block against a key block: [B, H, chunk, chunk] float32."""
  mask = masks.mask_block(*ids_i, *ids_j, bidirectional_images)[:, None]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
  return jnp.where(mask, logits / jnp.sqrt(jnp.float32(q_i.shape[-1])), jnp.finfo(jnp.float32).min)


def _id_blocks(segment_ids, image_ids, chunk):
  index = jnp.arange(segment_ids.shape[1])
  return [tuple(a[..., i:i + chunk] for a in (segment_ids, image_ids, index))
          for i in range(0, segment_ids.shape[1], chunk)]


def _block_attention_forward(q, k, v, segment_ids, image_ids, visible, chunk, bidirectional_images):
  """(out [B, H, L, Dh] in v's dtype, log-sum-exp [B, H, L] float32) over the visible blocks; q, k, v: [B, H, L, Dh]."""
  ids, ks, vs = _id_blocks(segment_ids, image_ids, chunk), _blocks(k, chunk), _blocks(v, chunk)
  outs, lses = [], []
  for i, q_i in enumerate(_blocks(q, chunk)):
    def key_block(j, carry, q_i=q_i, i=i):
      m, l, acc = carry
      logits = _block_logits(q_i, ks[j], ids[i], ids[j], bidirectional_images)
      m_new = jnp.maximum(m, logits.max(axis=-1))
      p = jnp.exp(logits - m_new[..., None])
      correction = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vs[j], preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    shape = q_i.shape[:-1]
    carry = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, v.shape[-1])))
    for j in range(len(ks)):
      carry = jax.lax.cond(visible[i, j], functools.partial(key_block, j), lambda c: c, carry)
    m, l, acc = carry
    outs.append((acc / l[..., None]).astype(v.dtype))
    lses.append(m + jnp.log(l))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _block_attention(q, k, v, segment_ids, image_ids, visible, chunk, bidirectional_images):
  """block_skipping_attention on [B, H, L, Dh] blocks of `chunk`; visible: [n, n] bool (query, key block)."""
  return _block_attention_forward(q, k, v, segment_ids, image_ids, visible, chunk, bidirectional_images)[0]


def _block_attention_fwd(q, k, v, segment_ids, image_ids, visible, chunk, bidirectional_images):
  out, lse = _block_attention_forward(q, k, v, segment_ids, image_ids, visible, chunk, bidirectional_images)
  out, lse = (checkpoint_name(a, ATTENTION_NAME) for a in (out, lse))
  return out, (q, k, v, segment_ids, image_ids, visible, out, lse)


def _block_attention_bwd(chunk, bidirectional_images, residuals, dout):
  q, k, v, segment_ids, image_ids, visible, out, lse = residuals
  ids = _id_blocks(segment_ids, image_ids, chunk)
  qs, ks, vs, douts, lses = (_blocks(a, chunk) for a in (q, k, v, dout.astype(v.dtype), lse))
  deltas = _blocks(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), chunk)  # [B, H, L]
  scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)  # noqa: E731
  dqs, dks, dvs = [zeros(a) for a in qs], [zeros(a) for a in ks], [zeros(a) for a in vs]
  for i in range(len(qs)):
    for j in range(len(ks)):
      def block_grads(carry, i=i, j=j):
        dq, dk, dv = carry
        p = jnp.exp(_block_logits(qs[i], ks[j], ids[i], ids[j], bidirectional_images) - lses[i][..., None])
        dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), douts[i], preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", douts[i], vs[j], preferred_element_type=jnp.float32)
        ds = (p * (dp - deltas[i][..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, ks[j], preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qs[i], preferred_element_type=jnp.float32)
        return dq, dk, dv

      dqs[i], dks[j], dvs[j] = jax.lax.cond(visible[i, j], block_grads, lambda c: c, (dqs[i], dks[j], dvs[j]))
  grads = [jnp.concatenate(blocks, axis=2).astype(a.dtype) for blocks, a in ((dqs, q), (dks, k), (dvs, v))]
  return (*grads, None, None, None)


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def dot_product_attention(q, k, v, q_ids, k_ids, bidirectional_images=True):
  """jax.nn.dot_product_attention with the mask (cuDNN flash attention on GPUs that support it)."""
  mask = masks.mask_block(*q_ids, *k_ids, bidirectional_images)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def attend(cfg: TransformerConfig, q, q_ids, parts):
  """The attention implementation cfg.attention names, under the mask cfg.image_attention names; arguments as
  attention_over."""
  bidirectional = cfg.image_attention == "bidirectional"
  if cfg.attention == "chunked":
    return chunked_attention(q, q_ids, parts, min(cfg.attention_chunk, q.shape[1]), bidirectional)
  if cfg.attention == "dot_product" and len(parts) == 1:
    return dot_product_attention(q, parts[0][0], parts[0][1], q_ids, parts[0][2], bidirectional)
  return attention_over(q, q_ids, parts, bidirectional)


def self_attention(cfg: TransformerConfig, q, k, v, segment_ids, image_ids):
  """The L elements of each row attending to each other (training, and decoding without a cache) with the
  implementation cfg.attention names.  q, k, v: [B, L, H, Dh]; segment_ids, image_ids: [B, L] -> [B, L, H, Dh]."""
  bidirectional = cfg.image_attention == "bidirectional"
  if cfg.attention == "chunked":
    return block_skipping_attention(q, k, v, segment_ids, image_ids, min(cfg.attention_chunk, q.shape[1]),
                                    bidirectional)
  if cfg.attention == "flash":
    return sharded_flash_attention(cfg, q, k, v, segment_ids, image_ids)
  q_ids = (segment_ids, image_ids, jnp.arange(q.shape[1]))
  return attend(cfg, q, q_ids, [(k, v, q_ids)])


def sharded_flash_attention(cfg: TransformerConfig, q, k, v, segment_ids, image_ids):
  """flash_attention (a Pallas TPU kernel, blocks of cfg.attention_chunk) on each device's rows and heads:
  a kernel is opaque to XLA's partitioner, so under a mesh it runs in shard_map, laid out by the logical rules."""
  attention = functools.partial(flash_attention.flash_attention, block=cfg.attention_chunk,
                                bidirectional_images=cfg.image_attention == "bidirectional")
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    spec = lambda a, names: even_spec(a.shape, nn.logical_to_mesh_axes(names), mesh.shape)  # noqa: E731
    rows, ids = spec(q, ("batch", "length", "act_heads", "kv")), spec(segment_ids, ("batch", "length"))
    attention = jax.shard_map(attention, in_specs=(rows, rows, rows, ids, ids), out_specs=rows, check_vma=False)
  return attention(q, k, v, segment_ids, image_ids)


def even_spec(shape, spec: jax.sharding.PartitionSpec, mesh_shape) -> jax.sharding.PartitionSpec:
  """`spec` for an array of `shape`, without the splits that would be uneven; mesh_shape: {axis: size}.
  (Here, below tfusion.sharding, which lays out every array with it, so the models need nothing above them.)"""
  even = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    even.append(axes if size % math.prod(mesh_shape[a] for a in names) == 0 else None)
  return jax.sharding.PartitionSpec(*even)


def write_slots(buffer, values, slots):
  """buffer[b, slots[b, i]] = values[b, i]; slots out of [0, L) are not written.

  buffer: [B, L, ...]; values: [B, Q, ...]; slots: [B, Q] int -> [B, L, ...].
  """
  slots = jnp.where(slots < 0, buffer.shape[1], slots)
  return jax.vmap(lambda buf, val, idx: buf.at[idx].set(val.astype(buf.dtype), mode="drop"))(buffer, values, slots)


@flax.struct.dataclass
class KVCache:
  """Every layer's keys and values for the slots of a sequence written so far, and the ids the mask
  reads for them.  keys, values: [layers, B, L, H, Dh]; segment_ids, image_ids: [B, L] int (0 in slots
  never written, so nothing attends to them)."""
  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  image_ids: jax.Array

  @classmethod
  def empty(cls, cfg: TransformerConfig, batch: int, length: int) -> "KVCache":
    kv = nn.with_logical_constraint(jnp.zeros((cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim), cfg.dtype),
                                    ("layers", "batch", "length", "act_heads", "kv"))
    ids = jnp.zeros((batch, length), jnp.int32)
    return cls(keys=kv, values=kv, segment_ids=ids, image_ids=ids)

  @property
  def length(self) -> int:
    return self.segment_ids.shape[1]


class Attention(nn.Module):
  """Multi-head self-attention under the Transfusion mask.  x: [B, L, D] -> ([B, L, D], kv).

  segment_ids, image_ids, positions: [B, L] int (the batch arrays the mask is built from).
  Training: kv is None and the L elements attend to each other. Decoding: the L elements are a block
  written at cache slots write_index [B, L]; they attend to the cache's keys and values kv = (keys,
  values) [B, K, H, Dh] (whose ids `cached_ids` hide the slots being rewritten) and to their own;
  returns the block's (keys, values) [B, L, H, Dh] for the caller to write into the cache.

  With cfg.qk_norm, queries and keys are RMS-normalised over the head dim (one learned scale [Dh] each, shared
  by the heads) before RoPE, so every attention implementation and the KV cache see normalised keys.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, segment_ids, image_ids, positions, kv=None, cached_ids=None, write_index=None):
    cfg = self.cfg
    qkv_shape, qkv_axes = (cfg.d_model, cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv")
    q = _projection(cfg, "query", "bld,dhk->blhk", qkv_shape, qkv_axes)(x)
    k = _projection(cfg, "key", "bld,dhk->blhk", qkv_shape, qkv_axes)(x)
    v = _projection(cfg, "value", "bld,dhk->blhk", qkv_shape, qkv_axes)(x)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, axis="kv", name="query_norm")(q)
      k = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, axis="kv", name="key_norm")(k)
    q = apply_rope(q, positions, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.rope_theta)
    q, k, v = (nn.with_logical_constraint(a, ("batch", "length", "act_heads", "kv")) for a in (q, k, v))
    if kv is None:
      out = self_attention(cfg, q, k, v, segment_ids, image_ids)
    else:
      q_ids = (segment_ids, image_ids, write_index)
      out = attend(cfg, q, q_ids, [(*kv, cached_ids), (k, v, q_ids)])
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", "kv"))
    out = _projection(cfg, "out", "blhk,hkd->bld", (cfg.num_heads, cfg.head_dim, cfg.d_model),
                      ("heads", "kv", "embed"), fan_in_axes=(0, 1))(out)
    return out, (None if kv is None else (k, v))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)).  x: [B, L, D] -> [B, L, D]."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _projection(cfg, "gate", "bld,dm->blm", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))(x)
    up = _projection(cfg, "up", "bld,dm->blm", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _projection(cfg, "down", "blm,md->bld", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))(h)


class Block(nn.Module):
  """Residual block; fits nn.scan: (x, segment_ids, image_ids, positions[, kv, cached_ids, write_index]) ->
  (x, the block's kv or None). See Attention for the decoding arguments.

  cfg.norm_placement = "pre" (Llama):  h = x + attn(norm(x));  out = h + mlp(norm(h)).
  "branch_output" (Chameleon's norm reordering, from Swin Transformer v2; Chameleon §2.3):
  h = x + norm(attn(x));  out = h + norm(mlp(h)). The residual stream itself is never normalised inside a block;
  the final RMSNorm before the heads stays.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, segment_ids, image_ids, positions, kv=None, cached_ids=None, write_index=None):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
    attention, mlp = Attention(cfg, name="attention"), SwiGLU(cfg, name="mlp")
    if cfg.norm_placement == "pre":
      attended, kv = attention(norm("attention_norm")(x), segment_ids, image_ids, positions, kv, cached_ids,
                               write_index)
      x = x + attended
      x = x + mlp(norm("mlp_norm")(x))
    else:
      attended, kv = attention(x, segment_ids, image_ids, positions, kv, cached_ids, write_index)
      x = x + norm("attention_norm")(attended)
      x = x + norm("mlp_norm")(mlp(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), kv


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # save the linear layers' outputs (and any other matmul without batch dims) and the blockwise attentions'
    # output and log-sum-exp; recompute the rest
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(contraction.OUTPUT_NAME, ATTENTION_NAME)),
}


class Transformer(nn.Module):
  """num_layers Blocks scanned over a leading `layers` axis, then a final RMSNorm.

  x: [B, L, D]; segment_ids, image_ids, positions: [B, L] int -> (normed, residual) [B, L, D] each: the
  output of the final RMSNorm and the residual stream it normalises.
  With a KVCache, the L elements are a block written at cache slots write_index [B, L] (slots out
  of range are not written) and attend to everything cached -> ((normed, residual), updated cache).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, segment_ids, image_ids, positions, cache: KVCache | None = None, write_index=None):
    cfg = self.cfg
    scan = functools.partial(nn.scan, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=cfg.num_layers, unroll=cfg.num_layers if cfg.unroll_layers else 1,
                             metadata_params={nn.PARTITION_NAME: "layers"})
    if cache is None:
      block = Block
      if cfg.remat_policy != "none":
        # Unrolled, prevent_cse keeps XLA from merging a layer's recomputation into its forward pass.
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=cfg.unroll_layers)
      layers = scan(block, in_axes=(nn.broadcast,) * 3)
      x, _ = layers(cfg, name="layers")(x, segment_ids, image_ids, positions)
    else:
      # The slots this block rewrites (e.g. the previous denoising step's image) are hidden from the cached part.
      hidden = write_slots(cache.segment_ids, jnp.zeros_like(segment_ids), write_index)
      cached_ids = (hidden, cache.image_ids, jnp.arange(cache.length))
      layers = scan(Block, in_axes=(nn.broadcast,) * 3 + (0, nn.broadcast, nn.broadcast))
      x, (keys, values) = layers(cfg, name="layers")(x, segment_ids, image_ids, positions, (cache.keys, cache.values),
                                                     cached_ids, write_index)
      # One write of every layer's block keys/values after the scan, in place on the carried cache.
      write = jax.vmap(write_slots, in_axes=(0, 0, None))
      cache = KVCache(keys=write(cache.keys, keys, write_index), values=write(cache.values, values, write_index),
                      segment_ids=write_slots(cache.segment_ids, segment_ids, write_index),
                      image_ids=write_slots(cache.image_ids, image_ids, write_index))
    out = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x), x
    return out if cache is None else (out, cache)
