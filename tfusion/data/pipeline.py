"""grain pipeline: mix the text stream and image-caption examples by element count, pack rows, batch.

Each JAX process reads a disjoint share of every source (sharded before shuffling), reshuffled each
epoch. The packer is a grain iterator whose whole state is a few integers, so the orbax checkpoint
holds it and a restored run continues with exactly the next batch.
"""
import dataclasses
from typing import Callable, Sequence

import grain
import numpy as np

from tfusion.data import sequence


@dataclasses.dataclass(frozen=True)
class MixOptions:
  text_fraction: float        # share of elements from the text stream
  caption_first_prob: float   # caption-then-image order rate for image-caption pairs
  num_timesteps: int
  image_first_max_t: int      # noise cap for image-first pairs
  seed: int


def shard_and_shuffle(source, seed: int, process_index: int, process_count: int) -> grain.MapDataset:
  """This process's share of a random-access source; index i >= len continues into reshuffled epochs."""
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"a source of {len(source)} examples has no examples for process {process_index} "
                     f"of {process_count}")
  return ds.shuffle(seed=seed)


class PackedRows(grain.IterDataset):
  """Infinite stream of packed rows (dicts of numpy arrays, see tfusion.data.sequence).

  text_docs[i]: [n] int32 token ids of a whole document, BOS ... EOS; long documents continue
  across rows (each part is its own segment). image_examples[i]: (caption_ids, latents [h, w, c]).
  """

  def __init__(self, text_docs: grain.MapDataset, image_examples: grain.MapDataset,
               layout: sequence.RowLayout, special: sequence.SpecialIds, mix: MixOptions):
    super().__init__()
    self.text_docs, self.image_examples = text_docs, image_examples
    self.layout, self.special, self.mix = layout, special, mix

  def __iter__(self):
    return _PackedRowIterator(self)


class _PackedRowIterator(grain.DatasetIterator):

  def __init__(self, ds: PackedRows):
    super().__init__()
    self.ds = ds
    self.state = dict(text_index=0, text_offset=0, image_index=0, text_elements=0, image_elements=0)

  def get_state(self) -> dict:
    return dict(self.state)

  def set_state(self, state: dict) -> None:
    self.state = {k: int(state[k]) for k in self.state}

  def _wants_text(self) -> bool:
    f, s = self.ds.mix.text_fraction, self.state
    return s["text_elements"] * (1 - f) <= s["image_elements"] * f if 0 < f < 1 else f == 1

  def _image_document(self):
    mix, index = self.ds.mix, self.state["image_index"]
    caption_ids, latents = self.ds.image_examples[index]
    caption_first = np.random.default_rng((mix.seed, index)).random() < mix.caption_first_prob
    return sequence.image_caption_document(caption_ids, latents, caption_first, self.ds.special,
                                           mix.num_timesteps, mix.image_first_max_t)

  def _add_text(self, row) -> None:
    """Fill as much of the row as the current text document allows; long documents continue later."""
    s = self.state
    rest = self.ds.text_docs[s["text_index"]][s["text_offset"]:]
    take = min(len(rest), row.room)
    row.add([sequence.TextPiece(np.asarray(rest[:take], np.int32))])
    s["text_elements"] += take
    if take == len(rest):
      s["text_index"] += 1
      s["text_offset"] = 0
    else:
      s["text_offset"] += take

  def __next__(self) -> dict:
    row = sequence.RowBuilder(self.ds.layout, self.ds.special, self.ds.mix.num_timesteps)
    while row.room > 0:
      if self._wants_text():
        self._add_text(row)
        continue
      pieces = self._image_document()
      if row.fits(pieces):
        row.add(pieces)
        self.state["image_index"] += 1
        self.state["image_elements"] += self.ds.layout.document_length(pieces)
      elif row.length == 0 or self.ds.mix.text_fraction == 0:
        if row.length == 0:
          raise ValueError(
              f"image-caption example {self.state['image_index']} (stream index) needs "
              f"{self.ds.layout.document_length(pieces)} elements, more than seq_len = {self.ds.layout.seq_len}")
        break
      else:
        self._add_text(row)   # the image waits for the next row; text fills this one
    return row.arrays()


def train_batches(text_docs: Sequence[np.ndarray], image_source, prepare_image: Callable,
                  layout: sequence.RowLayout, special: sequence.SpecialIds, mix: MixOptions,
                  rows_per_process: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Batches of packed rows for this process: dicts of [rows_per_process, ...] numpy arrays.

  prepare_image(example) -> (caption_ids, latents [h, w, c]) turns a source example into model inputs.
  """
  texts = shard_and_shuffle(text_docs, mix.seed, process_index, process_count)
  images = shard_and_shuffle(image_source, mix.seed + 1, process_index, process_count).map(prepare_image)
  rows = PackedRows(texts, images, layout, special, mix)
  return grain.experimental.ThreadPrefetchIterDataset(rows.batch(rows_per_process, drop_remainder=True),
                                                      prefetch_buffer_size=2)
