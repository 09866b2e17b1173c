"""grain pipeline: a weighted mixture of document sources, packed into rows, batched per JAX process.

A source is a random-access dataset of one kind (text documents, image-caption pairs, or editing
examples), a function that turns an example into model inputs, and a weight: its share of the packed
elements (the paper mixes text and image-caption data 1:1 by element count). The packer takes the next
document from the source furthest below its share. Images are never split; a document longer than a row
continues in the next rows, cut inside text only; an image document that does not fit the rest of a row
waits for the next row while text fills this one (without a text source the row is padded).

Row r of every global batch comes from its own stream: a packer over the r-th of batch_size disjoint
shares of every source (sharded before shuffling, reshuffled each epoch). A JAX process runs the streams of
its rows only, so each host reads only its share and the global batch is the same for any number of
processes. A stream's position is three integers per source and every row carries the position of its
stream after it, so the batch iterator knows where each stream stands after the rows it returned, whichever
worker made them. Those positions are the iterator state saved in every checkpoint: a restored run
continues with exactly the next batch, with any number of grain worker processes, and with any number of
processes (each takes its streams' positions from the files all processes saved; the global batch_size
must stay the same).

With W grain workers (mp_prefetch), worker w packs streams w, w + W, ... of this process and grain takes
one row from each worker in turn, so rows arrive in stream order. The workers ignore SIGINT and SIGTERM
(a Ctrl-C reaches the whole process group, a scheduler's SIGTERM every process of the job): the main
process handles them, saves and stops the workers. Only a signal in the first seconds of a worker, before
it has set that up (the first step of a run), still ends it, and the run with it.
"""
import dataclasses
import signal
from typing import Any, Callable, Sequence

import grain
import numpy as np

from tfusion.data import sequence

KINDS = ("text", "image_caption", "edit")
_POSITION_FIELDS = ("index", "offset", "elements")   # per source: document, elements into it, elements packed


@dataclasses.dataclass(frozen=True)
class MixOptions:
  caption_first_prob: float   # caption-then-image order rate for image-caption pairs
  num_timesteps: int
  image_first_max_t: int      # noise cap for image-first pairs
  seed: int
  caption_dropout_prob: float = 0.0  # caption-first pairs trained with an empty caption (for CFG)
  image_token_offset: int = 0        # > 0: images are VQ codes, tokens from this id on (sequence.image_tokens)


@dataclasses.dataclass(frozen=True)
class Source:
  """One weighted component of the mixture.

  prepare(example) gives, by kind: text -> token ids [n] (no BOS / EOS); image_caption -> (caption ids,
  latents [h, w, c]); edit -> (input latents, instruction ids, output latents).
  """
  name: str
  kind: str
  examples: Any               # random access: len(examples), examples[i]
  prepare: Callable
  weight: float

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"data source {self.name!r}: unknown kind {self.kind!r}, expected one of {KINDS}")
    if not self.weight >= 0:
      raise ValueError(f"data source {self.name!r}: weight must be >= 0, got {self.weight}")


def take(source, n: int, start: int = 0) -> list:
  """Examples start, ..., start + n - 1 of a random-access source (fewer at its end), read in one call."""
  return source.__getitems__(list(range(start, min(start + n, len(source)))))


def shard_and_shuffle(source, seed: int, shard: int, num_shards: int, name: str = "") -> grain.MapDataset:
  """Share `shard` of `num_shards` of a random-access source; index i >= len continues into reshuffled
  epochs."""
  ds = grain.MapDataset.source(source)[shard::num_shards]
  if len(ds) == 0:
    raise ValueError(f"data source {name!r} of {len(source)} examples has none for row stream {shard} of {num_shards} "
                     f"(every row of the global batch needs its own share: use a smaller batch_size or more data)")
  return ds.shuffle(seed=seed)


@dataclasses.dataclass(frozen=True)
class RowStream:
  """Row stream `stream`: what its packers read. `shares[k]` is this stream's share of sources[k]."""
  sources: Sequence[Source]
  shares: Sequence[grain.MapDataset]
  layout: sequence.RowLayout
  special: sequence.SpecialIds
  mix: MixOptions
  stream: int

  def start_position(self) -> dict:
    return {field: [0] * len(self.sources) for field in _POSITION_FIELDS}


class Packer:
  """An endless iterator of the packed rows of a RowStream (dicts of numpy arrays, see sequence), from
  `position` on."""

  def __init__(self, spec: RowStream, position: dict):
    if not any(s.weight > 0 for s in spec.sources):
      raise ValueError("the data mixture has no source with a weight above 0")
    self.sources, self.shares, self.layout, self.special, self.mix = (
        spec.sources, spec.shares, spec.layout, spec.special, spec.mix)
    self.stream = spec.stream
    self.position = {field: [int(v) for v in position[field]] for field in _POSITION_FIELDS}
    self._cached = {}          # source -> (index, document): the document a split or a deferral returns to

  def _document(self, k: int) -> list:
    """The unpacked rest of source k's current document."""
    index = self.position["index"][k]
    if self._cached.get(k, (None,))[0] != index:
      self._cached[k] = (index, self._make_document(k, index))
    return sequence.drop_elements(self.layout, self._cached[k][1], self.position["offset"][k])

  def _make_document(self, k: int, index: int) -> list:
    source, mix, special = self.sources[k], self.mix, self.special
    inputs = source.prepare(self.shares[k][index])
    if source.kind == "text":
      return sequence.text_document(inputs, special)
    if source.kind == "edit":
      if mix.image_token_offset:
        raise ValueError(f"data source {source.name!r}: editing examples need continuous images, not the vq codec")
      return sequence.edit_document(*inputs, special, mix.num_timesteps)
    caption_ids, latents = inputs
    order_draw, dropout_draw = np.random.default_rng((mix.seed, k, self.stream, index)).random(2)
    caption_first = order_draw < mix.caption_first_prob
    if caption_first and dropout_draw < mix.caption_dropout_prob:
      caption_ids = []          # the unconditional branch of classifier-free guidance: [BOS image EOS]
    if mix.image_token_offset:
      return sequence.discrete_image_caption_document(caption_ids, latents, caption_first, special,
                                                      mix.image_token_offset)
    return sequence.image_caption_document(caption_ids, latents, caption_first, special, mix.num_timesteps,
                                           mix.image_first_max_t)

  def _most_behind(self, kinds=KINDS) -> int | None:
    """The source of one of `kinds` furthest below its share of the packed elements (lowest index on ties)."""
    candidates = [k for k, s in enumerate(self.sources) if s.weight > 0 and s.kind in kinds]
    if not candidates:
      return None
    return min(candidates, key=lambda k: (self.position["elements"][k] / self.sources[k].weight, k))

  def _add(self, row: sequence.RowBuilder, k: int, pieces: list, whole: bool) -> None:
    row.add(pieces)
    n = self.layout.document_length(pieces)
    self.position["elements"][k] += n
    if whole:
      self.position["index"][k] += 1
      self.position["offset"][k] = 0
    else:
      self.position["offset"][k] += n

  def _add_head(self, row: sequence.RowBuilder, k: int, pieces: list) -> bool:
    """Adds the longest head of `pieces` that fits the row; False if not even one element fits."""
    head = sequence.longest_prefix(self.layout, pieces, row.room, row.image_room)
    if not head:
      return False
    self._add(row, k, head, whole=self.layout.document_length(head) == self.layout.document_length(pieces))
    return True

  def __next__(self) -> dict:
    row = sequence.RowBuilder(self.layout, self.special, self.mix.num_timesteps)
    while row.room > 0:
      k = self._most_behind()
      pieces = self._document(k)
      if row.fits(pieces):
        self._add(row, k, pieces, whole=True)
        continue
      splits = self.sources[k].kind == "text" or not self.layout.fits_one_row(pieces)
      if splits and self._add_head(row, k, pieces):
        continue
      if row.length == 0:
        raise ValueError(
            f"{self.sources[k].kind} example {self.position['index'][k]} of data source {self.sources[k].name!r} "
            f"(stream index) has an image of {self.layout.patches_per_image + 2} elements after "
            f"{self.position['offset'][k]} elements, more than seq_len = {self.layout.seq_len}")
      text = self._most_behind(kinds=("text",))
      if text is None:
        break                   # the image waits for the next row; nothing can fill this one
      self._add_head(row, text, self._document(text))
    return row.arrays()


class RowStreams(grain.IterDataset):
  """Rows of `streams` in turn (0, 1, ..., 0, 1, ...) from `positions` ({stream: position}) on, each with its
  stream id ("stream") and that stream's position after it ("stream_position", int64 [3, sources]).
  Sliceable, so grain workers split the streams."""

  def __init__(self, streams: Sequence[RowStream], positions: dict):
    super().__init__()
    self.streams, self.positions = list(streams), positions

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self.streams = self.streams[sl]

  def __iter__(self):
    return _RowStreamsIterator(self)


class _RowStreamsIterator(grain.DatasetIterator):

  def __init__(self, ds: RowStreams):
    super().__init__()
    self.packers = [Packer(s, ds.positions[s.stream]) for s in ds.streams]
    self.turn = 0

  def __next__(self) -> dict:
    stream = self.packers[self.turn % len(self.packers)]
    self.turn += 1
    row = next(stream)
    row["stream"] = np.int64(stream.stream)
    row["stream_position"] = np.array([stream.position[f] for f in _POSITION_FIELDS], np.int64)
    return row

  def get_state(self) -> dict:
    return {}                   # TrainBatches keeps the state, from the positions the rows carry

  def set_state(self, state: dict) -> None:
    raise NotImplementedError("restore through TrainBatches.set_state")


class TrainBatches(grain.DatasetIterator):
  """This process's rows of each global batch: dicts of [len(streams), ...] numpy arrays."""

  def __init__(self, streams: Sequence[RowStream], workers: int = 0, prefetch: int = 2):
    super().__init__()
    self._rows = None
    if workers < 0 or (workers and len(streams) % workers):
      raise ValueError(f"config.data.workers = {workers} must be 0 (no worker processes) or divide the "
                       f"{len(streams)} rows each process packs (batch_size / process count)")
    self.streams, self.workers, self.prefetch = list(streams), workers, prefetch
    self.ids = [s.stream for s in self.streams]
    self.sources = [f"{s.name} ({s.kind}, {len(s.examples)} examples)" for s in self.streams[0].sources]
    self.positions = {s.stream: s.start_position() for s in self.streams}

  def _start(self):
    ds = RowStreams(self.streams, self.positions)
    if self.workers:
      ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=self.prefetch), worker_init_fn=_ignore_stop_signals)
    elif self.prefetch:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.prefetch)
    return iter(ds)

  def __next__(self) -> dict:
    if self._rows is None:
      self._rows = self._start()
    rows = []
    for want in self.ids:
      row = next(self._rows)
      stream, position = int(row.pop("stream")), row.pop("stream_position")
      if stream != want:
        raise RuntimeError(f"row of stream {stream} arrived where stream {want} was due")
      self.positions[stream] = {f: position[i].tolist() for i, f in enumerate(_POSITION_FIELDS)}
      rows.append(row)
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def get_state(self) -> dict:
    return dict(streams=self.ids, sources=self.sources, positions=[self.positions[i] for i in self.ids])

  def set_state(self, state: dict) -> None:
    if list(state["streams"]) != self.ids:
      raise ValueError(f"the data state was saved for row streams {list(state['streams'])}, but this process "
                       f"reads row streams {self.ids}: resume with the same batch_size and number of processes")
    if list(state["sources"]) != self.sources:
      raise ValueError(f"the data state was saved for the sources {list(state['sources'])}, this run has "
                       f"{self.sources}: a changed mixture needs a new workdir (config.init_from starts it from "
                       "this run's params)")
    self.close()
    self.positions = dict(zip(self.ids, state["positions"]))

  def restore_from_processes(self, states: Sequence[dict]) -> None:
    """Restore from the states every process of a run saved, whatever their number: this process takes
    the positions of its own row streams (the global batch_size must be the same)."""
    saved = {stream: position for state in states for stream, position in zip(state["streams"], state["positions"])}
    missing = [i for i in self.ids if i not in saved]
    if missing:
      raise ValueError(f"the data state holds row streams {sorted(saved)}, not this process's {missing}: resume "
                       "with the batch_size the run was saved with")
    self.set_state(dict(streams=self.ids, sources=states[0]["sources"], positions=[saved[i] for i in self.ids]))

  def close(self) -> None:
    """Stops the worker processes (a new iteration starts them again)."""
    if self._rows is not None and hasattr(self._rows, "close"):
      self._rows.close()
    self._rows = None


def _ignore_stop_signals(worker: int, workers: int) -> None:  # pylint: disable=unused-argument
  """grain worker start: SIGINT and SIGTERM are for the main process (tfusion.training.preemption)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_batches(sources: Sequence[Source], layout: sequence.RowLayout, special: sequence.SpecialIds,
                  mix: MixOptions, global_rows: int, *, process_index: int = 0, process_count: int = 1,
                  workers: int = 0, prefetch: int = 2) -> TrainBatches:
  """This process's rows of each global batch: dicts of [global_rows / process_count, ...] numpy arrays."""
  rows_per_process = global_rows // process_count
  streams = []
  for row in range(process_index * rows_per_process, (process_index + 1) * rows_per_process):
    shares = [shard_and_shuffle(s.examples, mix.seed + k, row, global_rows, s.name) for k, s in enumerate(sources)]
    streams.append(RowStream(tuple(sources), tuple(shares), layout, special, mix, stream=row))
  return TrainBatches(streams, workers, prefetch)
