import numpy as np
import pytest

from tfusion import masks
from tfusion.data import sequence
from tests.helpers import image_doc, packed_rows, text_doc

LAYOUT = sequence.RowLayout(seq_len=64, latent_shape=(4, 4, 3), patch_size=2)   # 4 patches per image


def brute_force_mask(segment_ids, image_ids, bidirectional_images=True):
  """The rule of the paper, written out position by position (without its image term: plain causal)."""
  n = len(segment_ids)
  allow = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      if segment_ids[i] == 0:
        allow[i, j] = i == j
      elif segment_ids[i] == segment_ids[j]:
        allow[i, j] = j <= i or (bidirectional_images and image_ids[i] != 0 and image_ids[i] == image_ids[j])
  return allow


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_mask_matches_brute_force_on_packed_rows_with_several_images(bidirectional):
  batch = packed_rows(LAYOUT, [
      [image_doc(LAYOUT, caption_first=True), text_doc(5), image_doc(LAYOUT, caption_first=False)],
      [text_doc(3), [*image_doc(LAYOUT)[:2], *image_doc(LAYOUT, seed=1)[1:]], image_doc(LAYOUT)],
  ])
  assert (batch["image_valid"].sum(axis=1) == [2, 3]).all()
  mask = np.asarray(masks.transfusion_mask(batch["segment_ids"], batch["image_ids"], bidirectional))
  for b in range(2):
    np.testing.assert_array_equal(mask[b], brute_force_mask(batch["segment_ids"][b], batch["image_ids"][b],
                                                            bidirectional))


def test_mask_entries_around_one_image():
  # [BOS c c c BOI p p p p EOI EOS] then a second document.
  batch = packed_rows(LAYOUT, [[image_doc(LAYOUT), text_doc(4)]])
  mask = np.asarray(masks.transfusion_mask(batch["segment_ids"], batch["image_ids"]))[0]
  boi, first_patch, last_patch, eoi = 4, 5, 8, 9
  assert mask[first_patch, last_patch]          # patches see later patches of their own image
  assert mask[first_patch, boi] and mask[first_patch, 0]   # and everything before the image
  assert not mask[last_patch, eoi]              # but not what follows the image
  assert not mask[boi, first_patch]             # BOI is an ordinary causal text position
  assert mask[eoi, first_patch:last_patch + 1].all()       # text after the image sees all of it
  assert not mask[11, 10] and not mask[11, 0]   # the next document sees nothing of the first
  assert mask[12, 11]


def test_causal_image_attention_hides_later_patches_only():
  batch = packed_rows(LAYOUT, [[image_doc(LAYOUT), text_doc(4)]])
  both = [np.asarray(masks.transfusion_mask(batch["segment_ids"], batch["image_ids"], b))[0] for b in (True, False)]
  first_patch, last_patch = 5, 8
  differs = np.argwhere(both[0] != both[1])
  # Exactly the 6 (earlier patch, later patch) pairs of the 4-patch image change.
  assert sorted(map(tuple, differs)) == [(i, j) for i in range(first_patch, last_patch + 1)
                                         for j in range(i + 1, last_patch + 1)]
  assert both[1][last_patch, first_patch:last_patch + 1].all() and not both[1][first_patch, first_patch + 1]


def _rows_with_padding():
  """Two rows of 64 with several documents and images each, the second padded at the end."""
  return packed_rows(LAYOUT, [
      [image_doc(LAYOUT, caption_first=True), text_doc(5), image_doc(LAYOUT, caption_first=False),
       [*image_doc(LAYOUT)[:2], *image_doc(LAYOUT, seed=1)[1:]], text_doc(20)],
      [text_doc(3), image_doc(LAYOUT), text_doc(9)],
  ])


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_mask_is_causal_over_mask_positions_within_segments(bidirectional):
  """allow(q, k) = same segment and mpos[k] <= mpos[q] (padding: itself only), mpos non-decreasing."""
  batch = _rows_with_padding()
  assert (batch["segment_ids"][1, -10:] == 0).all() and (batch["segment_ids"][0] > 0).all()
  mpos = np.asarray(masks.mask_positions(batch["image_ids"], bidirectional))
  assert (np.diff(mpos, axis=1) >= 0).all()
  seg = batch["segment_ids"]
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  allow = same & (mpos[:, None, :] <= mpos[:, :, None]) | ((seg[:, :, None] == 0) & np.eye(64, dtype=bool))
  np.testing.assert_array_equal(allow, masks.transfusion_mask(batch["segment_ids"], batch["image_ids"], bidirectional))
  image = batch["image_ids"][0]
  first = np.flatnonzero(image == 1)
  np.testing.assert_array_equal(mpos[0, first], [first[-1] if bidirectional else p for p in first])


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_key_block_ranges_hold_exactly_the_visible_blocks(block, bidirectional):
  """Key blocks in [lo, hi] are those where the mask allows at least one (query, key) pair."""
  batch = _rows_with_padding()
  mask = np.asarray(masks.transfusion_mask(batch["segment_ids"], batch["image_ids"], bidirectional))
  n = 64 // block
  visible = mask.reshape(2, n, block, n, block).any(axis=(2, 4))
  lo, hi = masks.key_block_ranges(batch["segment_ids"], masks.mask_positions(batch["image_ids"], bidirectional), block)
  np.testing.assert_array_equal(masks.visible_blocks(lo, hi), visible)
  # Some blocks are skipped beyond the causal ones: the second document never sees the first.
  assert visible.sum() < 2 * n * (n + 1) // 2
