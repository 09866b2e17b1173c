"""Sample grids: images side by side with the caption each one was generated from."""
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_image_grid(path: str, images: np.ndarray, labels: list[str], tile: int = 128, columns: int = 4) -> None:
  """images: [N, S, S, 3] uint8 -> one PNG, each image upscaled to `tile` px with its label below."""
  font = ImageFont.load_default()
  label_height = 40
  rows = -(-len(images) // columns)
  grid = Image.new("RGB", (columns * tile, rows * (tile + label_height)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (image, label) in enumerate(zip(images, labels)):
    x, y = (i % columns) * tile, (i // columns) * (tile + label_height)
    grid.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x, y))
    draw.multiline_text((x + 2, y + tile + 2), "\n".join(textwrap.wrap(label, 22)[:3]), fill="black", font=font)
  grid.save(path)
