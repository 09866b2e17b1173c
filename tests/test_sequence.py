"""Row building, packing, caption/image ordering and noise caps."""
import collections
import dataclasses

import numpy as np
import pytest

from tfusion.data import pipeline, sequence
from tests.helpers import SPECIAL, image_doc, make_sources, make_stream, packed_rows, text_doc

LAYOUT = sequence.RowLayout(seq_len=48, latent_shape=(4, 4, 3), patch_size=2)   # 4 patches, 6 elements/image


def test_row_arrays_for_one_caption_first_document():
  batch = packed_rows(LAYOUT, [[image_doc(LAYOUT, caption=(10, 11), caption_first=True), text_doc(3, start=30)]])
  row = {k: v[0] for k, v in batch.items()}
  n = 10  # BOS c c BOI p p p p EOI EOS
  np.testing.assert_array_equal(row["tokens"][:n + 3], [2, 10, 11, 4, 0, 0, 0, 0, 5, 3, 30, 31, 32])
  np.testing.assert_array_equal(row["segment_ids"][:n + 3], [1] * n + [2] * 3)
  assert (row["segment_ids"][n + 3:] == 0).all()
  np.testing.assert_array_equal(row["positions"][:n + 3], list(range(n)) + [0, 1, 2])
  np.testing.assert_array_equal(row["image_ids"][:n], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
  # Targets: BOS->c, c->c, c->BOI; not BOI->patch, not patch->EOI; EOI->EOS; not across documents.
  np.testing.assert_array_equal(np.nonzero(row["text_loss_mask"])[0], [0, 1, 2, 8, 10, 11])
  np.testing.assert_array_equal(row["image_valid"], [True] + [False] * (LAYOUT.max_images - 1))
  np.testing.assert_array_equal(row["t_max"], [1000] * LAYOUT.max_images)


def test_image_first_document_gets_noise_cap():
  batch = packed_rows(LAYOUT, [[image_doc(LAYOUT, caption=(10, 11), caption_first=False)]])
  np.testing.assert_array_equal(batch["tokens"][0, :10], [2, 4, 0, 0, 0, 0, 5, 10, 11, 3])
  assert batch["t_max"][0, 0] == 500
  # BOS->BOI is a target (the model learns to open images); EOI->c, c->c, c->EOS.
  np.testing.assert_array_equal(np.nonzero(batch["text_loss_mask"][0])[0], [0, 6, 7, 8])


def test_builder_refuses_documents_that_do_not_fit():
  row = sequence.RowBuilder(LAYOUT, SPECIAL, 1000)
  row.add(text_doc(40))
  assert not row.fits(image_doc(LAYOUT))
  with pytest.raises(ValueError, match="does not fit"):
    row.add(image_doc(LAYOUT))


# ---- The packer over a stream of documents. -------------------------------------------------------
def image_spans(tokens, image_ids):
  """(BOI index, EOI index, image id) of every image in a row."""
  spans = []
  for k in range(1, image_ids.max() + 1):
    where = np.nonzero(image_ids == k)[0]
    spans.append((where[0] - 1, where[-1] + 1, k))
  return spans


def test_packing_keeps_images_whole_and_orders_captions_80_20():
  it = iter(make_stream())
  caption_first = image_first = 0
  text_elements = image_elements = total = 0
  for _ in range(60):
    batch = next(it)
    for b in range(4):
      tokens, seg, img = batch["tokens"][b], batch["segment_ids"][b], batch["image_ids"][b]
      total += (seg > 0).sum()
      assert batch["image_valid"][b].sum() == img.max()
      for boi, eoi, k in image_spans(tokens, img):
        assert tokens[boi] == SPECIAL.boi and tokens[eoi] == SPECIAL.eoi
        assert eoi - boi - 1 == LAYOUT.patches_per_image and seg[boi] == seg[eoi] != 0
        doc = seg == seg[boi]
        first = np.nonzero(doc)[0][0]
        is_caption_first = boi - first > 1             # more than BOS before BOI
        caption_first += is_caption_first
        image_first += not is_caption_first
        assert batch["t_max"][b, k - 1] == (1000 if is_caption_first else 500)
      for s in np.unique(seg[seg > 0]):
        if (img[seg == s] > 0).any():
          image_elements += (seg == s).sum()
        else:
          text_elements += (seg == s).sum()
  rate = caption_first / (caption_first + image_first)
  assert caption_first + image_first > 300 and 0.74 < rate < 0.86
  assert text_elements + image_elements == total
  assert abs(text_elements / total - 0.5) < 0.03
  assert total / (60 * 4 * 64) > 0.99         # text fills what images leave free


def test_image_slots_per_row_are_capped_and_the_mix_is_kept_above_its_mean():
  # 128-element rows hold 21 images of 6 elements; the 1:1 mix of ~12-element image documents puts ~5.3 in a
  # row. Capped at 7 slots, rows carry at most 7 and the images keep their share (the packer evens them out
  # over rows); capped at 3, text fills what images cannot take and their share falls.
  def pack(cap):
    it = make_stream(seq_len=128, max_images_per_row=cap)
    counts, per_row = collections.Counter(), []
    for _ in range(40):
      batch = next(it)
      counts.update(source_of_each_segment(batch))
      per_row.extend(batch["image_valid"].sum(1))
    assert batch["image_valid"].shape == (4, cap or 21)
    assert sum(counts.values()) == 40 * 4 * 128
    return counts["images"] / sum(counts.values()), max(per_row)

  uncapped, capped, too_few = pack(0), pack(7), pack(3)
  assert uncapped[1] > 7 and capped[1] == 7 and too_few[1] == 3
  assert abs(uncapped[0] - 0.5) < 0.03 and abs(capped[0] - 0.5) < 0.03
  assert too_few[0] < 0.35


def test_text_only_and_image_only_streams():
  text_only = next(iter(make_stream(text_fraction=1.0)))
  assert text_only["image_valid"].sum() == 0 and (text_only["segment_ids"] > 0).all()
  image_only = next(iter(make_stream(text_fraction=0.0)))
  assert (image_only["tokens"] < 100).all() and image_only["image_valid"].sum() >= 4


def test_iterator_state_restores_exact_continuation():
  it = iter(make_stream())
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = iter(make_stream())
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_image_longer_than_a_row_names_the_source():
  it = iter(make_stream(seq_len=5, text_fraction=0.0))
  with pytest.raises(ValueError, match="image_caption example 0 of data source 'images' .* seq_len = 5"):
    for _ in range(3):   # the first rows hold the captions that precede the image
      next(it)


def test_processes_read_disjoint_shares():
  source = list(range(10))
  shares = [pipeline.shard_and_shuffle(source, 0, p, 2) for p in range(2)]
  seen = [sorted(share[i] for i in range(len(share))) for share in shares]
  assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == source
  # The next epoch is reshuffled but covers the same share.
  assert sorted(shares[0][i] for i in range(5, 10)) == seen[0]


def test_global_batch_is_the_same_for_any_number_of_processes():
  it = iter(make_stream())
  shares = [iter(make_stream(process_index=p, process_count=2)) for p in range(2)]
  for _ in range(3):
    whole, halves = next(it), [next(share) for share in shares]
    assert halves[0]["tokens"].shape == (2, 64)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])


def test_data_state_of_other_rows_is_refused():
  first = iter(make_stream(process_index=0, process_count=2))
  next(first)
  second = iter(make_stream(process_index=1, process_count=2))
  with pytest.raises(ValueError, match=r"saved for row streams \[0, 1\].*reads row streams \[2, 3\]"):
    second.set_state(first.get_state())


def test_caption_dropout_empties_a_share_of_caption_first_captions():
  it = iter(make_stream(caption_dropout_prob=0.3))
  dropped = kept = image_first = 0
  for _ in range(60):
    batch = next(it)
    for b in range(4):
      tokens, seg, img = batch["tokens"][b], batch["segment_ids"][b], batch["image_ids"][b]
      for boi, eoi, k in image_spans(tokens, img):
        first = np.nonzero(seg == seg[boi])[0][0]
        if batch["t_max"][b, k - 1] == 500:                 # image-first: its caption is never dropped
          image_first += 1
          assert tokens[eoi + 1] != SPECIAL.eos
        elif boi - first == 1:                               # [BOS BOI ... EOI EOS]: no caption
          dropped += 1
          assert tokens[eoi + 1] == SPECIAL.eos
        else:
          kept += 1
  assert dropped + kept > 250 and 0.24 < dropped / (dropped + kept) < 0.36
  assert image_first > 40


# ---- Mixtures of several sources, long documents, editing rows, worker processes. ----------------
def source_of_each_segment(batch):
  """Element counts per source, told apart by token range: text 100+, captions 40-59, instructions 60-79."""
  counts = {"text": 0, "images": 0, "edits": 0}
  for b in range(len(batch["tokens"])):
    tokens, seg = batch["tokens"][b], batch["segment_ids"][b]
    for s in np.unique(seg[seg > 0]):
      doc = tokens[seg == s]
      kind = "text" if (doc >= 100).any() else "edits" if ((doc >= 60) & (doc < 80)).any() else "images"
      counts[kind] += len(doc)
  return counts


def edit_source(weight):
  def prepare(example):
    return (np.full((4, 4, 3), -1.0, np.float32), [60 + example % 20, 61],
            np.full((4, 4, 3), example, np.float32))
  return pipeline.Source("edits", "edit", list(range(40)), prepare, weight)


def test_three_source_mixture_follows_the_weights():
  sources = make_sources(text_fraction=0.5)
  sources = [dataclasses.replace(sources[0], weight=0.5), dataclasses.replace(sources[1], weight=0.3),
             edit_source(0.2)]
  it = make_stream(sources=sources, seq_len=128)
  totals = collections.Counter()
  for _ in range(50):
    totals.update(source_of_each_segment(next(it)))
  total = sum(totals.values())
  for name, weight in [("text", 0.5), ("images", 0.3), ("edits", 0.2)]:
    assert abs(totals[name] / total - weight) < 0.03, (name, totals)


def test_edit_rows_read_the_input_as_context_and_learn_the_output():
  it = make_stream(sources=[edit_source(1.0)], seq_len=64)
  batch = next(it)
  row = {k: v[0] for k, v in batch.items()}
  # [BOS BOI in x4 EOI i i BOI out x4 EOI EOS] = 16 elements, 4 documents per row.
  np.testing.assert_array_equal(row["tokens"][:16], [2, 4, 0, 0, 0, 0, 5, row["tokens"][7], 61, 4, 0, 0, 0, 0, 5, 3])
  np.testing.assert_array_equal(row["image_valid"][:8], [False, True] * 4)
  np.testing.assert_array_equal(row["t_max"][:8], [sequence.CONTEXT_TIMESTEP, 1000] * 4)
  assert (row["latents"][0] == -1).all() and (row["latents"][1] >= 0).all()
  assert (row["segment_ids"] > 0).all()


def test_long_document_is_split_inside_text_never_inside_an_image():
  def prepare(example):
    return list(range(40, 60)) * 2, np.full((4, 4, 3), example, np.float32)   # 40-token caption
  sources = [pipeline.Source("images", "image_caption", list(range(30)), prepare, 1.0)]
  it = make_stream(sources=sources, seq_len=24, caption_first_prob=1.0)
  rows = [{k: v[0] for k, v in next(it).items()} for _ in range(6)]
  # Caption-first documents of 48 elements: BOS + 23 caption | 17 caption BOI p p p p EOI EOS | ...
  assert (rows[0]["tokens"] == [2] + (list(range(40, 60)) * 2)[:23]).all()
  np.testing.assert_array_equal(rows[1]["tokens"][:24], (list(range(40, 60)) * 2)[23:] + [4, 0, 0, 0, 0, 5, 3])
  np.testing.assert_array_equal(rows[1]["positions"][:24], np.arange(24))     # a continuation restarts at 0
  for row in rows:
    for boi, eoi, _ in image_spans(row["tokens"], row["image_ids"]):
      assert row["tokens"][boi] == SPECIAL.boi and row["tokens"][eoi] == SPECIAL.eoi and eoi - boi == 5


def assert_same_batches(got, want):
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_worker_processes_give_the_same_batches_and_state_moves_between_worker_counts():
  in_process = make_stream()
  want = [next(in_process) for _ in range(5)]
  two_workers = make_stream(workers=2)
  try:
    assert_same_batches([next(two_workers) for _ in range(3)], want[:3])
    state = two_workers.get_state()
  finally:
    two_workers.close()
  resumed = make_stream(workers=4)
  try:
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(2)], want[3:])
  finally:
    resumed.close()
  again = make_stream()
  again.set_state(state)
  assert_same_batches([next(again)], want[3:4])


def test_worker_count_must_divide_the_rows():
  with pytest.raises(ValueError, match="config.data.workers = 3 must be 0 .* divide the 4 rows"):
    make_stream(workers=3)


def test_a_run_saved_by_two_processes_resumes_on_one():
  shares = [make_stream(process_index=p, process_count=2) for p in range(2)]
  for share in shares:
    for _ in range(3):
      next(share)
  states = [share.get_state() for share in shares]
  halves = [next(share) for share in shares]
  whole = make_stream()
  whole.restore_from_processes(states)
  got = next(whole)
  for k in got:
    np.testing.assert_array_equal(got[k], np.concatenate([h[k] for h in halves]))
  with pytest.raises(ValueError, match=r"holds row streams \[0, 1\], not this process's \[2, 3\]"):
    make_stream().restore_from_processes(states[:1])


# ---- Cuts next to an image. --------------------------------------------------------------------
def caption_image_eos(n):
  """[BOS c * n] [image: 6 elements] [EOS]."""
  return sequence.image_caption_document(list(range(40, 40 + n)), np.zeros(LAYOUT.latent_shape, np.float32),
                                         True, SPECIAL, 1000, 500)


def test_longest_prefix_stops_before_an_image_that_does_not_fit():
  doc = caption_image_eos(3)

  def lengths(pieces):
    return [LAYOUT.piece_length(p) for p in pieces]

  assert lengths(sequence.longest_prefix(LAYOUT, doc, room=9, image_room=2)) == [4]       # 4 + 6 > 9
  assert lengths(sequence.longest_prefix(LAYOUT, doc, room=10, image_room=2)) == [4, 6]
  assert lengths(sequence.longest_prefix(LAYOUT, doc, room=10, image_room=0)) == [4]
  assert lengths(sequence.longest_prefix(LAYOUT, doc, room=11, image_room=1)) == [4, 6, 1]


def test_drop_elements_resumes_right_after_an_image():
  doc = caption_image_eos(3)
  rest = sequence.drop_elements(LAYOUT, doc, 10)
  assert len(rest) == 1 and list(rest[0].ids) == [SPECIAL.eos]
  assert isinstance(sequence.drop_elements(LAYOUT, doc, 4)[0], sequence.ImagePiece)
  with pytest.raises(ValueError, match="into an image"):
    sequence.drop_elements(LAYOUT, doc, 6)


def long_caption_source():
  def prepare(example):
    return list(range(40, 60)), np.full((4, 4, 3), example, np.float32)
  return [pipeline.Source("images", "image_caption", list(range(30)), prepare, 1.0)]


def test_split_document_image_at_the_row_end_waits_for_the_next_row():
  it = make_stream(sources=long_caption_source(), seq_len=24, caption_first_prob=1.0)
  rows = [{k: v[0] for k, v in next(it).items()} for _ in range(2)]
  np.testing.assert_array_equal(rows[0]["tokens"], [2] + list(range(40, 60)) + [0, 0, 0])
  assert rows[0]["image_valid"].sum() == 0
  np.testing.assert_array_equal(rows[1]["tokens"][:7], [4, 0, 0, 0, 0, 5, 3])


def test_document_continues_right_after_an_image_that_ended_a_row():
  it = make_stream(sources=long_caption_source(), seq_len=7, caption_first_prob=0.0)  # row 0: BOS BOI pppp EOI
  rows = [{k: v[0] for k, v in next(it).items()} for _ in range(5)]
  np.testing.assert_array_equal(rows[0]["tokens"], [2, 4, 0, 0, 0, 0, 5])
  np.testing.assert_array_equal(np.concatenate([r["tokens"] for r in rows[1:4]]), list(range(40, 60)) + [3])
