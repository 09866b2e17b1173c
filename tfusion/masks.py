"""The Transfusion attention mask: causal everywhere, bidirectional inside each image, per document.

allow(i, j) = seg[i] == seg[j] != 0 and (j <= i or img[i] == img[j] != 0)

With bidirectional_images=False the second term goes and patches are causal in raster order too: the
"causal" arm of the paper's Table 5 ablation.

Built inside the jitted step from the batch's per-position arrays, whole or one block of queries at
a time; it is never materialised on the host.
"""
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
