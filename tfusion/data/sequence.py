"""Documents -> fixed-shape packed rows (the batch format of the train step).

A document is a list of pieces: text ids, or an image (clean latents + its largest allowed
diffusion timestep). An image piece occupies BOI, n patch slots (raster order), EOI. Rows are
packed to `seq_len` with one segment id per document and positions restarting at 0, and nothing
is cut mid-image.

Row arrays (all numpy, fixed shapes):
  tokens          [L] int32   text ids, BOI/EOI ids; PAD at patch slots and padding
  segment_ids     [L] int32   document index within the row, 1-based; 0 = padding
  positions       [L] int32   RoPE positions, restarting at 0 in every segment
  image_ids       [L] int32   k >= 1 on the patch slots of the row's k-th image, else 0
  text_loss_mask  [L] bool    position l predicts tokens[l + 1] (both text, same segment)
  latents         [M, h, w, c] float32  clean latents of the row's images, zeros in unused slots
  image_valid     [M] bool    the image's eps MSE counts in the loss (False for unused slots and for
                              context images, e.g. the input image of an editing example)
  t_max           [M] int32   largest timestep for that image (noise limiting), T in unused slots

A document longer than a row is split across rows between or inside text pieces, never inside an image;
each part is its own segment (positions restart at 0).

Discrete images (the Chameleon baseline, data.codec = vq) are no image pieces: an image is the text piece
[BOI codes EOI] whose codes (a VQ-VAE's, raster order) are vocabulary ids after the text vocabulary. Such rows
have no image slots (M = 0) and the LM loss covers the codes like any text.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  bos: int
  eos: int
  boi: int
  eoi: int

  @classmethod
  def of(cls, tokenizer) -> "SpecialIds":
    """The special ids of a data.tokenizer.Tokenizer."""
    t = tokenizer
    return cls(pad=t.pad_id, bos=t.bos_id, eos=t.eos_id, boi=t.boi_id, eoi=t.eoi_id)


@dataclasses.dataclass(frozen=True)
class TextPiece:
  ids: np.ndarray                 # [n] int32


# Context images (inputs the model reads but does not learn to generate: prompt images, finished images when
# decoding, the input image of an editing row) are read at this timestep: 1, the least-noisy one training
# uses (alpha_bar_1 = 0.99996 under the cosine schedule). t = 0 would be an embedding training never shows,
# since it draws t from {1, ..., t_max}.
CONTEXT_TIMESTEP = 1


@dataclasses.dataclass(frozen=True)
class ImagePiece:
  latents: np.ndarray             # [h, w, c] float32
  t_max: int
  loss: bool = True               # False: a context image (t = CONTEXT_TIMESTEP, no eps loss)


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """seq_len elements per row; images of latent_shape in patch_size patches; max_images_per_row caps the image
  slots of a row (each slot costs the patch encoder and decoder whether it holds an image or not; 0 = no cap
  below what seq_len holds); discrete_images: images are code tokens in text pieces, and rows have no slots."""
  seq_len: int
  latent_shape: tuple[int, int, int]
  patch_size: int
  max_images_per_row: int = 0
  discrete_images: bool = False

  @property
  def patches_per_image(self) -> int:
    h, w, _ = self.latent_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def max_images(self) -> int:
    """Most images a row holds: each needs BOI + n patches + EOI, and at most max_images_per_row if set."""
    if self.discrete_images:
      return 0
    fit = self.seq_len // (self.patches_per_image + 2)
    return min(fit, self.max_images_per_row) if self.max_images_per_row else fit

  def piece_length(self, piece) -> int:
    return len(piece.ids) if isinstance(piece, TextPiece) else self.patches_per_image + 2

  def document_length(self, pieces) -> int:
    return sum(self.piece_length(p) for p in pieces)

  def fits_one_row(self, pieces) -> bool:
    """Whether a document fits an empty row (else it must be split)."""
    images = sum(isinstance(p, ImagePiece) for p in pieces)
    return self.document_length(pieces) <= self.seq_len and images <= self.max_images


def dummy_batch(rows: int, layout: RowLayout) -> dict:
  """Zero arrays with the batch format's shapes, for initialisation and abstract compilation."""
  def zeros(*shape, dtype=jnp.int32):
    return jnp.zeros(shape, dtype)
  seq_len, max_images = layout.seq_len, layout.max_images
  return dict(tokens=zeros(rows, seq_len), segment_ids=zeros(rows, seq_len), positions=zeros(rows, seq_len),
              image_ids=zeros(rows, seq_len), text_loss_mask=zeros(rows, seq_len, dtype=bool),
              latents=zeros(rows, max_images, *layout.latent_shape, dtype=jnp.float32),
              image_valid=zeros(rows, max_images, dtype=bool), t_max=zeros(rows, max_images))


def model_inputs(batch: dict) -> tuple:
  """The positional model inputs for a batch dict (clean latents stand in for noisy ones)."""
  return (batch["tokens"], batch["segment_ids"], batch["positions"], batch["image_ids"],
          batch["latents"], batch["t_max"])


def image_caption_document(caption_ids, latents, caption_first: bool, special: SpecialIds,
                           num_timesteps: int, image_first_max_t: int) -> list:
  """[BOS caption (image) EOS] or [BOS (image) caption EOS]; image-first pairs get the noise cap."""
  caption = np.asarray(caption_ids, np.int32)
  if caption_first:
    return [TextPiece(np.concatenate([[special.bos], caption]).astype(np.int32)),
            ImagePiece(latents, num_timesteps), TextPiece(np.array([special.eos], np.int32))]
  return [TextPiece(np.array([special.bos], np.int32)), ImagePiece(latents, image_first_max_t),
          TextPiece(np.concatenate([caption, [special.eos]]).astype(np.int32))]


def image_tokens(codes, offset: int, special: SpecialIds) -> np.ndarray:
  """A discrete image's ids: [BOI, codes + offset (raster order), EOI]. codes: [h, w] (or [h, w, 1]) code indices,
  any numeric dtype; offset: the text vocabulary's size."""
  codes = np.rint(np.asarray(codes)).astype(np.int64).reshape(-1) + offset
  return np.concatenate([[special.boi], codes, [special.eoi]]).astype(np.int32)


def discrete_image_caption_document(caption_ids, codes, caption_first: bool, special: SpecialIds,
                                    offset: int) -> list:
  """[BOS caption BOI codes EOI EOS] or [BOS BOI codes EOI caption EOS], one text piece (see image_tokens)."""
  caption, image = np.asarray(caption_ids, np.int32), image_tokens(codes, offset, special)
  middle = [caption, image] if caption_first else [image, caption]
  return [TextPiece(np.concatenate([[special.bos], *middle, [special.eos]]).astype(np.int32))]


def text_document(ids, special: SpecialIds) -> list:
  """[BOS ids EOS]."""
  return [TextPiece(np.concatenate([[special.bos], np.asarray(ids, np.int32), [special.eos]]).astype(np.int32))]


def edit_document(input_latents, instruction_ids, output_latents, special: SpecialIds, num_timesteps: int) -> list:
  """[BOS (input image) instruction (output image) EOS]: the input is a context image, the output is
  generated (paper §4.5)."""
  return [TextPiece(np.array([special.bos], np.int32)),
          ImagePiece(input_latents, CONTEXT_TIMESTEP, loss=False),
          TextPiece(np.asarray(instruction_ids, np.int32)),
          ImagePiece(output_latents, num_timesteps), TextPiece(np.array([special.eos], np.int32))]


def drop_elements(layout: RowLayout, pieces, count: int) -> list:
  """The pieces after the first `count` elements of a document; `count` must not end inside an image."""
  rest = []
  for piece in pieces:
    n = layout.piece_length(piece)
    if count >= n:
      count -= n
    elif isinstance(piece, TextPiece):
      rest.append(TextPiece(piece.ids[count:]))
      count = 0
    elif count == 0:
      rest.append(piece)
    else:
      raise ValueError(f"a document cannot resume {count} elements into an image")
  return rest


def longest_prefix(layout: RowLayout, pieces, room: int, image_room: int) -> list:
  """The longest head of a document that fits `room` elements and `image_room` images, cut inside or after
  a text piece, never inside an image."""
  head = []
  for piece in pieces:
    if isinstance(piece, TextPiece):
      take = piece.ids[:room]
      if len(take):
        head.append(TextPiece(take))
      room -= len(take)
      if len(take) < len(piece.ids):
        break
    elif layout.piece_length(piece) <= room and image_room > 0:
      head.append(piece)
      room -= layout.piece_length(piece)
      image_room -= 1
    else:
      break
  return head


class RowBuilder:
  """Appends whole documents to one row until it is full, then emits the row arrays."""

  def __init__(self, layout: RowLayout, special: SpecialIds, num_timesteps: int):
    self.layout, self.special = layout, special
    n = layout.seq_len
    self.tokens = np.full(n, special.pad, np.int32)
    self.segment_ids = np.zeros(n, np.int32)
    self.positions = np.zeros(n, np.int32)
    self.image_ids = np.zeros(n, np.int32)
    self.latents = np.zeros((layout.max_images, *layout.latent_shape), np.float32)
    self.image_valid = np.zeros(layout.max_images, bool)
    self.t_max = np.full(layout.max_images, num_timesteps, np.int32)
    self.length = 0
    self.num_documents = 0
    self.num_images = 0

  @property
  def room(self) -> int:
    return self.layout.seq_len - self.length

  @property
  def image_room(self) -> int:
    return self.layout.max_images - self.num_images

  def fits(self, pieces) -> bool:
    images = sum(isinstance(p, ImagePiece) for p in pieces)
    return (self.layout.document_length(pieces) <= self.room
            and images <= self.image_room)

  def add(self, pieces) -> None:
    """Append one document as a new segment. The caller checks `fits` first."""
    if not self.fits(pieces):
      raise ValueError(f"document of {self.layout.document_length(pieces)} elements does not fit "
                       f"the {self.room} free elements of the row")
    self.num_documents += 1
    start = self.length
    for piece in pieces:
      at = self.length
      if isinstance(piece, TextPiece):
        self.tokens[at:at + len(piece.ids)] = piece.ids
        self.length += len(piece.ids)
      else:
        n = self.layout.patches_per_image
        self.tokens[at] = self.special.boi
        self.tokens[at + n + 1] = self.special.eoi
        self.image_ids[at + 1:at + n + 1] = self.num_images + 1
        self.latents[self.num_images] = piece.latents
        self.image_valid[self.num_images] = piece.loss
        self.t_max[self.num_images] = piece.t_max
        self.num_images += 1
        self.length += n + 2
    self.segment_ids[start:self.length] = self.num_documents
    self.positions[start:self.length] = np.arange(self.length - start)

  def arrays(self) -> dict:
    """The row in the batch format described in the module docstring."""
    is_text = (self.segment_ids > 0) & (self.image_ids == 0)
    mask = np.zeros(self.layout.seq_len, bool)
    mask[:-1] = is_text[:-1] & is_text[1:] & (self.segment_ids[:-1] == self.segment_ids[1:])
    return dict(tokens=self.tokens, segment_ids=self.segment_ids, positions=self.positions,
                image_ids=self.image_ids, text_loss_mask=mask, latents=self.latents,
                image_valid=self.image_valid, t_max=self.t_max)
