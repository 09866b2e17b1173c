"""The Transfusion attention mask: causal everywhere, bidirectional inside each image, per document.

allow(i, j) = seg[i] == seg[j] != 0 and (j <= i or img[i] == img[j] != 0)

With bidirectional_images=False the second term goes and patches are causal in raster order too: the
"causal" arm of the paper's Table 5 ablation.

Built inside the jitted step from the batch's per-position arrays, whole or one block of queries at
a time; it is never materialised on the host.
"""
import jax
import jax.numpy as jnp


def mask_block(q_segment, q_image, q_index, k_segment, k_image, k_index, bidirectional_images: bool = True):
  """Mask entries for a block of queries against a block of keys -> [B, Q, K] bool.

  q_segment, q_image: [B, Q] int and k_segment, k_image: [B, K] int (0 = padding / not an image);
  q_index: [Q] or [B, Q], k_index: [K] or [B, K] int positions (cache slots) of those queries and keys in the row.
  Padding queries attend to themselves only, so every softmax row has at least one entry.
  """
  causal = q_index[..., :, None] >= k_index[..., None, :]
  same_segment = (q_segment[:, :, None] == k_segment[:, None, :]) & (q_segment[:, :, None] != 0)
  same_image = (q_image[:, :, None] == k_image[:, None, :]) & (q_image[:, :, None] != 0)
  padding_self = (q_segment[:, :, None] == 0) & (q_index[..., :, None] == k_index[..., None, :])
  allowed = causal | same_image if bidirectional_images else causal
  return (same_segment & allowed) | padding_self


def transfusion_mask(segment_ids, image_ids, bidirectional_images: bool = True):
  """segment_ids, image_ids: [B, L] int -> [B, L, L] bool (query, key)."""
  index = jnp.arange(segment_ids.shape[-1])
  return mask_block(segment_ids, image_ids, index, segment_ids, image_ids, index, bidirectional_images)


def mask_positions(image_ids, bidirectional_images: bool = True):
  """The position each element is masked at: its own, or for a patch (bidirectional images) the position
  of its image's last patch.  image_ids: [B, L] int -> [B, L] int32, non-decreasing along each row.

  Within a segment, allow(q, k) = mpos[k] <= mpos[q]: the Transfusion mask is causal over these
  positions, which is what lets attention kernels skip whole blocks of it.
  """
  index = jnp.broadcast_to(jnp.arange(image_ids.shape[1], dtype=jnp.int32), image_ids.shape)
  if not bidirectional_images:
    return index
  after = jnp.pad(image_ids[:, 1:], ((0, 0), (0, 1)))
  inside = (image_ids > 0) & (after == image_ids)          # a patch followed by a patch of its image
  return jax.lax.cummin(jnp.where(inside, image_ids.shape[1], index), axis=1, reverse=True)


def key_block_ranges(segment_ids, mpos, block: int):
  """For each block of `block` queries, the range [lo, hi] of key blocks (same block grid) that hold a key
  one of its queries may see; blocks outside it are fully hidden.  segment_ids, mpos: [B, L] -> (lo, hi)
  [B, L / block] int32 each.

  Segments are contiguous runs of equal nonzero ids and mpos is non-decreasing, so a query block sees
  keys from the start of its first query's segment up to the last query's mask position; a padding
  query (segment 0) sees itself only, in its own (diagonal) block.
  """
  batch, length = segment_ids.shape
  n = length // block
  index = jnp.arange(length, dtype=jnp.int32)
  boundary = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  segment_start = jax.lax.cummax(jnp.where(boundary, index, 0), axis=1)
  real = (segment_ids > 0).reshape(batch, n, block)
  start, last = segment_start.reshape(batch, n, block), mpos.reshape(batch, n, block)
  diagonal = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(real, start, length), axis=2) // block
  hi = jnp.max(jnp.where(real, last, -1), axis=2) // block
  has_padding = ~jnp.all(real, axis=2)
  lo = jnp.where(has_padding, jnp.minimum(lo, diagonal), lo)
  hi = jnp.where(has_padding, jnp.maximum(hi, diagonal), hi)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def visible_blocks(lo, hi):
  """The [B, n, n] bool (query block, key block) table of key_block_ranges' (lo, hi) [B, n]."""
  blocks = jnp.arange(lo.shape[-1])
  return (lo[..., None] <= blocks) & (blocks <= hi[..., None])


def visible_block_pairs(segment_ids, image_ids, block: int, bidirectional_images: bool = True):
  """The [n, n] bool (query block, key block) pairs of `block` elements that some row of the batch needs:
  what block-skipping attention computes.  segment_ids, image_ids: [B, L], L a multiple of block."""
  lo, hi = key_block_ranges(segment_ids, mask_positions(image_ids, bidirectional_images), block)
  return jnp.any(visible_blocks(lo, hi), axis=0)
