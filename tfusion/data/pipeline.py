"""grain pipeline: mix the text stream and image-caption examples by element count, pack rows, batch.

Row r of every global batch comes from its own stream: a packer over the r-th of batch_size
disjoint shares of each source (sharded before shuffling, reshuffled each epoch). A JAX process
runs the streams of its rows only, so each host reads only its share, and the global batch is the
same for any number of processes. A packer's state is a few integers, so the orbax checkpoint holds
every stream's position and a restored run continues with exactly the next batch.
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
  caption_dropout_prob: float = 0.0  # caption-first pairs trained with an empty caption (for CFG)


def shard_and_shuffle(source, seed: int, shard: int, num_shards: int) -> grain.MapDataset:
  """Share `shard` of `num_shards` of a random-access source; index i >= len continues into reshuffled
  epochs."""
  ds = grain.MapDataset.source(source)[shard::num_shards]
  if len(ds) == 0:
    raise ValueError(f"a source of {len(source)} examples has none for row stream {shard} of {num_shards} "
                     f"(every row of the global batch needs its own share: use a smaller batch_size or more data)")
  return ds.shuffle(seed=seed)


class PackedRows(grain.IterDataset):
  """Infinite stream of packed rows (dicts of numpy arrays, see tfusion.data.sequence).

  text_docs[i]: [n] int32 token ids of a whole document, BOS ... EOS; long documents continue
  across rows (each part is its own segment). image_examples[i]: (caption_ids, latents [h, w, c]).
  """

  def __init__(self, text_docs: grain.MapDataset, image_examples: grain.MapDataset,
               layout: sequence.RowLayout, special: sequence.SpecialIds, mix: MixOptions, stream: int = 0):
    super().__init__()
    self.text_docs, self.image_examples = text_docs, image_examples
    self.layout, self.special, self.mix, self.stream = layout, special, mix, stream

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
    order_draw, dropout_draw = np.random.default_rng((mix.seed, self.ds.stream, index)).random(2)
    caption_first = order_draw < mix.caption_first_prob
    if caption_first and dropout_draw < mix.caption_dropout_prob:
      caption_ids = []          # the unconditional branch of classifier-free guidance: [BOS image EOS]
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


class StackedRows(grain.IterDataset):
  """Batches whose row r is the next row of streams[r]: dicts of [len(streams), ...] numpy arrays."""

  def __init__(self, streams: Sequence[PackedRows]):
    super().__init__()
    self.streams = list(streams)

  def __iter__(self):
    return _StackedRowIterator(self)


class _StackedRowIterator(grain.DatasetIterator):

  def __init__(self, ds: StackedRows):
    super().__init__()
    self.ids = [s.stream for s in ds.streams]
    self.iterators = [iter(s) for s in ds.streams]

  def get_state(self) -> dict:
    return dict(streams=self.ids, positions=[it.get_state() for it in self.iterators])

  def set_state(self, state: dict) -> None:
    if list(state["streams"]) != self.ids:
      raise ValueError(f"the data state was saved for row streams {list(state['streams'])}, but this process "
                       f"reads row streams {self.ids}: resume with the same batch_size and number of processes")
    for it, position in zip(self.iterators, state["positions"]):
      it.set_state(position)

  def __next__(self) -> dict:
    rows = [next(it) for it in self.iterators]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def train_batches(text_docs: Sequence[np.ndarray], image_source, prepare_image: Callable,
                  layout: sequence.RowLayout, special: sequence.SpecialIds, mix: MixOptions,
                  global_rows: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This process's rows of each global batch: dicts of [global_rows / process_count, ...] numpy arrays.

  prepare_image(example) -> (caption_ids, latents [h, w, c]) turns a source example into model inputs.
  """
  rows_per_process = global_rows // process_count
  streams = []
  for row in range(process_index * rows_per_process, (process_index + 1) * rows_per_process):
    texts = shard_and_shuffle(text_docs, mix.seed, row, global_rows)
    images = shard_and_shuffle(image_source, mix.seed + 1, row, global_rows).map(prepare_image)
    streams.append(PackedRows(texts, images, layout, special, mix, stream=row))
  return grain.experimental.ThreadPrefetchIterDataset(StackedRows(streams), prefetch_buffer_size=2)
