"""Block-sparse flash attention for TPUs (Pallas) under the Transfusion mask.

The mask is causal over mask positions within a segment (masks.mask_positions):
allow(q, k) = seg[q] == seg[k] and mpos[k] <= mpos[q]; a padding element (segment 0) sees itself only,
which the kernels get by giving each padding element a segment of its own. For every block of queries,
masks.key_block_ranges gives the range [lo, hi] of key blocks holding a visible key; the kernels run
only on those (block, block) pairs and the index maps clamp the block index into [lo, hi], so hidden
key blocks are neither loaded nor computed. The ranges are scalar-prefetched: they depend on where each
row's documents and images are, so packed rows (several documents per row) skip the blocks between
documents too.

Forward: online softmax over the visible key blocks, saving the log-sum-exp. Backward (custom VJP):
one kernel accumulates dk, dv over the query blocks that see a key block, another dq over the key
blocks a query block sees, both recomputing the probabilities from the log-sum-exp.

Layout inside: [B, H, L, Dh] blocks of (block, Dh); per-query statistics are [B, H, L, 128] (replicated
over the 128 lanes, as TPU kernels keep row statistics), the ids [B, L, 128] on the query side and
[B, 8, L] on the key side. `interpret=True` runs the same kernels on CPU (Pallas interpret mode).
"""
import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from tfusion import masks

LANES, SUBLANES = 128, 8
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite: exp(MASKED - m) is 0 and never NaN
NT = (((1,), (1,)), ((), ()))                        # a @ b.T
VMEM_LIMIT = 64 * 2**20                              # 512 x 512 blocks need ~32 MiB of scoped VMEM
OUTPUT_NAME = "attention_output"                     # the output and log-sum-exp, for remat policies


def _allowed(q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, shape):
  """The mask of one (query block, key block) pair -> [bq, bk] bool, from ids [bq, 128] and [8, bk]."""
  bq, bk = shape
  tile = lambda ref: jnp.tile(ref[...], (1, bk // LANES))  # noqa: E731   [bq, 128] -> [bq, bk]
  return (tile(q_seg_ref) == k_seg_ref[:1, :]) & (k_pos_ref[:1, :] <= tile(q_pos_ref))


def _probabilities(q, k, lse, mask, scale):
  """exp(q k^T * scale - lse) under the mask -> [bq, bk] float32; lse: [bq, 128]."""
  logits = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, MASKED)
  return jnp.exp(logits - jnp.tile(lse[:, :1], (1, logits.shape[1])))


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref,
                    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, scale):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when((lo_ref[b, i] <= j) & (j <= hi_ref[b, i]))
  def _visible_block():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    logits = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(_allowed(q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, logits.shape), logits, MASKED)
    m_prev = m_scratch[...]                                            # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    p = jnp.exp(logits - jnp.tile(m_next[:, :1], (1, logits.shape[1])))
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scratch[...] = alpha[:, :1] * acc_scratch[...] + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scratch[...]
    o_ref[...] = (acc_scratch[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = m_scratch[...] + jnp.log(l)


def _dkv_kernel(lo_ref, hi_ref, first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, scale):
  """Grid (B, H, key block j, query block i): dk, dv of key block j summed over the query blocks."""
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when((lo_ref[b, i] <= j) & (j <= hi_ref[b, i]))
  def _visible_block():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    mask = _allowed(q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, (q.shape[0], k.shape[0]))
    p = _probabilities(q, k, lse_ref[...], mask, scale)                          # [bq, bk]
    dv_scratch[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.tile(di_ref[:, :1], (1, dp.shape[1]))) * scale
    dk_scratch[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_seg_ref, q_pos_ref, k_seg_ref,
               k_pos_ref, dq_ref, dq_scratch, *, scale):
  """Grid (B, H, query block i, key block j): dq of query block i summed over its visible key blocks."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  @pl.when((lo_ref[b, i] <= j) & (j <= hi_ref[b, i]))
  def _visible_block():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    mask = _allowed(q_seg_ref, q_pos_ref, k_seg_ref, k_pos_ref, (q.shape[0], k.shape[0]))
    p = _probabilities(q, k, lse_ref[...], mask, scale)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.tile(di_ref[:, :1], (1, dp.shape[1]))) * scale
    dq_scratch[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["block"],
                   data_fields=["lo", "hi", "first", "last", "q_seg", "q_pos", "k_seg", "k_pos"])
@dataclasses.dataclass(frozen=True)
class _Layout:
  """What the kernels read besides q, k, v: the visible key blocks [lo, hi] of each query block and the
  query blocks [first, last] that see each key block ([B, n] int32), the ids (segments, mask positions)
  on the query side [B, L, 128] and on the key side [B, 8, L], and the block length."""
  lo: jax.Array
  hi: jax.Array
  first: jax.Array
  last: jax.Array
  q_seg: jax.Array
  q_pos: jax.Array
  k_seg: jax.Array
  k_pos: jax.Array
  block: int


def _layout(segment_ids, image_ids, block, bidirectional_images) -> _Layout:
  batch, length = segment_ids.shape
  mpos = masks.mask_positions(image_ids, bidirectional_images)
  lo, hi = masks.key_block_ranges(segment_ids, mpos, block)
  visible = masks.visible_blocks(lo, hi)                                   # [B, query block, key block]
  n = lo.shape[1]
  first = jnp.argmax(visible, axis=1).astype(jnp.int32)
  last = (n - 1 - jnp.argmax(visible[:, ::-1], axis=1)).astype(jnp.int32)
  # A padding element gets a segment of its own (negative), so the mask lets it see itself only.
  seg = jnp.where(segment_ids > 0, segment_ids, -1 - jnp.arange(length, dtype=jnp.int32)).astype(jnp.int32)
  q_side = lambda a: jnp.broadcast_to(a[:, :, None], (batch, length, LANES))  # noqa: E731
  k_side = lambda a: jnp.broadcast_to(a[:, None, :], (batch, SUBLANES, length))  # noqa: E731
  return _Layout(lo, hi, first, last, q_side(seg), q_side(mpos), k_side(seg), k_side(mpos), block)


def _specs(block, head_dim):
  """BlockSpecs of the arrays, for a grid (b, h, outer, inner) whose index map gets the block indices of the
  queries (qi) and keys (kj) from (outer, inner) and the prefetched ranges."""
  spec = pl.BlockSpec
  rows = (None, None, block, head_dim)
  stats = (None, None, block, LANES)
  return dict(
      q=lambda qi: spec(rows, lambda b, h, o, n, *r: (b, h, qi(b, o, n, *r), 0)),
      k=lambda kj: spec(rows, lambda b, h, o, n, *r: (b, h, kj(b, o, n, *r), 0)),
      q_stats=lambda qi: spec(stats, lambda b, h, o, n, *r: (b, h, qi(b, o, n, *r), 0)),
      q_ids=lambda qi: spec((None, block, LANES), lambda b, h, o, n, *r: (b, qi(b, o, n, *r), 0)),
      k_ids=lambda kj: spec((None, SUBLANES, block), lambda b, h, o, n, *r: (b, 0, kj(b, o, n, *r))))


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                              vmem_limit_bytes=VMEM_LIMIT)


def _cost(q, fraction, matmuls, block):
  """What XLA's cost model is told about a kernel (it cannot look inside): `matmuls` [block, block, Dh]
  products per computed block pair, `fraction` of the pairs computed; q, o read or written once and
  k, v once per computed pair."""
  batch, heads, length, head_dim = q.shape
  pairs = (length // block) ** 2 * fraction
  rows = batch * heads * block * head_dim * q.dtype.itemsize
  return pl.CostEstimate(flops=int(2 * matmuls * batch * heads * block * block * head_dim * pairs),
                         transcendentals=int(batch * heads * block * block * pairs),
                         bytes_accessed=int(rows * (2 * length // block + 2 * pairs)))


def _causal_fraction(n):
  """The fraction of block pairs a causal row sees: what the cost estimate assumes (data decide the real one)."""
  return (n + 1) / (2 * n)


def _forward(q, k, v, layout: _Layout, interpret):
  batch, heads, length, head_dim = q.shape
  block, n = layout.block, length // layout.block
  s = _specs(block, head_dim)
  qi = lambda b, i, j, lo, hi: i  # noqa: E731
  kj = lambda b, i, j, lo, hi: jnp.clip(j, lo[b, i], hi[b, i])  # noqa: E731
  kernel = functools.partial(_forward_kernel, scale=1.0 / head_dim ** 0.5)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, n, n),
          in_specs=[s["q"](qi), s["k"](kj), s["k"](kj), s["q_ids"](qi), s["q_ids"](qi), s["k_ids"](kj),
                    s["k_ids"](kj)],
          out_specs=[s["q"](qi), s["q_stats"](qi)],
          scratch_shapes=[pltpu.VMEM((block, LANES), jnp.float32), pltpu.VMEM((block, LANES), jnp.float32),
                          pltpu.VMEM((block, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length, LANES),
                                                                               jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, cost_estimate=_cost(q, _causal_fraction(n), 2, block),
  )(layout.lo, layout.hi, q, k, v, layout.q_seg, layout.q_pos, layout.k_seg, layout.k_pos)
  return o, lse


def _backward(q, k, v, o, lse, do, layout: _Layout, interpret):
  batch, heads, length, head_dim = q.shape
  block, n = layout.block, length // layout.block
  s = _specs(block, head_dim)
  scale = 1.0 / head_dim ** 0.5
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  di = jnp.broadcast_to(di, (batch, heads, length, LANES))
  fraction = _causal_fraction(n)

  # dk, dv: grid over (key block j, query block i), i clamped into the query blocks that see j.
  qi = lambda b, j, i, lo, hi, first, last: jnp.clip(i, first[b, j], last[b, j])  # noqa: E731
  kj = lambda b, j, i, *r: j  # noqa: E731
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(batch, heads, n, n),
          in_specs=[s["q"](qi), s["k"](kj), s["k"](kj), s["q"](qi), s["q_stats"](qi), s["q_stats"](qi),
                    s["q_ids"](qi), s["q_ids"](qi), s["k_ids"](kj), s["k_ids"](kj)],
          out_specs=[s["k"](kj), s["k"](kj)],
          scratch_shapes=[pltpu.VMEM((block, head_dim), jnp.float32), pltpu.VMEM((block, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(), interpret=interpret, cost_estimate=_cost(q, fraction, 4, block),
  )(layout.lo, layout.hi, layout.first, layout.last, q, k, v, do, lse, di, layout.q_seg, layout.q_pos,
    layout.k_seg, layout.k_pos)

  # dq: grid over (query block i, key block j), j clamped into the key blocks i sees.
  qi = lambda b, i, j, lo, hi: i  # noqa: E731
  kj = lambda b, i, j, lo, hi: jnp.clip(j, lo[b, i], hi[b, i])  # noqa: E731
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, n, n),
          in_specs=[s["q"](qi), s["k"](kj), s["k"](kj), s["q"](qi), s["q_stats"](qi), s["q_stats"](qi),
                    s["q_ids"](qi), s["q_ids"](qi), s["k_ids"](kj), s["k_ids"](kj)],
          out_specs=s["q"](qi),
          scratch_shapes=[pltpu.VMEM((block, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(), interpret=interpret, cost_estimate=_cost(q, fraction, 3, block),
  )(layout.lo, layout.hi, q, k, v, do, lse, di, layout.q_seg, layout.q_pos, layout.k_seg, layout.k_pos)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, layout, interpret):
  return _forward(q, k, v, layout, interpret)[0]


def _attention_fwd(q, k, v, layout, interpret):
  o, lse = _forward(q, k, v, layout, interpret)
  # The kernels keep lse on all 128 lanes; the residual is one lane: [B, H, L], 128 times smaller.
  o, lse = (checkpoint_name(a, OUTPUT_NAME) for a in (o, lse[..., 0]))
  return o, (q, k, v, o, lse, layout)


def _attention_bwd(interpret, residuals, do):
  q, k, v, o, lse, layout = residuals
  lse = jnp.broadcast_to(lse[..., None], (*lse.shape, LANES))
  dq, dk, dv = _backward(q, k, v, o, lse, do, layout, interpret)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, segment_ids, image_ids, block=512, bidirectional_images=True, interpret=False):
  """Self-attention of each row's elements under the Transfusion mask, skipping hidden blocks.

  q, k, v: [B, L, H, Dh]; segment_ids, image_ids: [B, L] int; L a multiple of `block` (itself a multiple
  of 128) -> [B, L, H, Dh]. interpret=True runs the kernels in Pallas' interpret mode (any backend).
  """
  block = min(block, q.shape[1])
  layout = _layout(segment_ids, image_ids, block, bidirectional_images)
  to_heads = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731   [B, L, H, Dh] <-> [B, H, L, Dh]
  return to_heads(_attention(to_heads(q), to_heads(k), to_heads(v), layout, interpret))
