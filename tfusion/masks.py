"""The Transfusion attention mask: causal everywhere, bidirectional inside each image, per document.

allow(i, j) = seg[i] == seg[j] != 0 and (j <= i or img[i] == img[j] != 0)

Built inside the jitted step from the batch's per-position arrays; it is never materialised on the host.
"""
import jax.numpy as jnp


def transfusion_mask(segment_ids, image_ids):
  """segment_ids, image_ids: [B, L] int (0 = padding / not an image) -> [B, L, L] bool (query, key).

  Padding queries attend to themselves only, so every softmax row has at least one entry.
  """
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] != 0)
  padding_self = (segment_ids[:, :, None] == 0) & jnp.eye(length, dtype=bool)
  return (same_segment & (causal | same_image)) | padding_self
