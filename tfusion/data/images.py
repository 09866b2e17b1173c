"""Images for training: decode, centre-crop to a square, resize; bad images raise BadRecord."""
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadRecord(ValueError):
  """A source record that cannot be used; its message is the reason in the skip report, and the part before
  the first ":" its category in the manifest's counts."""


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB as displayed: EXIF orientation applied, transparency composited onto white, 16-bit scaled."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255).astype(np.uint8))
  elif image.mode == "F":
    raise BadRecord("unsupported image mode: 32-bit float")
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
  return image.convert("RGB")


def square_resized(image: Image.Image, size: int, min_size: int) -> np.ndarray:
  """The centred square crop of `image` (as to_rgb shows it) resized to uint8 [size, size, 3]."""
  image = to_rgb(image)
  w, h = image.size
  if min(w, h) < min_size:
    raise BadRecord(f"too small image: {w}x{h}, min_image_size = {min_size}")
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  image = image.crop((left, top, left + side, top + side))
  if side != size:
    image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
  return np.asarray(image, np.uint8)


def load_image(data, size: int, min_size: int) -> np.ndarray:
  """Encoded image bytes, a path, or a uint8 array [H, W, C] -> uint8 [size, size, 3]."""
  try:
    if isinstance(data, np.ndarray):
      image = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
      image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
      image.load()
  except Image.DecompressionBombError as e:
    raise BadRecord(f"too large image: {e}") from e
  except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
    raise BadRecord(f"unreadable image: {e}") from e
  try:
    return square_resized(image, size, min_size)
  except OSError as e:      # a truncated file fails only when its pixels are read
    raise BadRecord(f"unreadable image: {e}") from e
