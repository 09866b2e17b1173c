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
