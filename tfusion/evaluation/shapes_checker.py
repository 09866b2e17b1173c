"""An analytic GenEval-style checker for the shapes data: what is in an image, and does it match a caption.

Classic image processing, no learned model. Pixels brighter than a threshold are foreground; each takes
the colour of COLORS whose direction in RGB is nearest (anti-aliased edges are the colour times a
coverage in [0, 1] over black). Connected regions of one colour are objects. An object's shape comes from
its coverage-weighted area over the area of the box every object fits in (OBJECT_SIZE of the image
side): square 1, circle pi / 4, triangle 1 / 2.

check_image(image, scene) scores a generated image against the scene of its prompt, GenEval's way, per
attribute:
  objects   the number of objects
  colors    the colours, with multiplicity
  shapes    the shapes, with multiplicity
  counting  every group of the prompt has its count of objects of its shape and colour
  binding   the (shape, colour) of every object, with multiplicity (no extra, none missing)
  position  two-group prompts: every object of the first group is left of (or above) every object of
            the second, with a gap between them
  all       binding, and position where the prompt has one
"""
import dataclasses
import re

import numpy as np
from scipy import ndimage

from tfusion.data import shapes

FOREGROUND = 0.3          # coverage above which a pixel belongs to an object
_DIRECTIONS = np.array([np.array(rgb) / np.linalg.norm(rgb) for rgb in shapes.COLORS.values()])
_UNIT_AREAS = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
ATTRIBUTES = ("objects", "colors", "shapes", "counting", "binding", "position", "all")


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  shape: str
  color: str
  cx: float           # centre of mass, fractions of the image side
  cy: float
  x0: float           # extent, fractions of the image side
  x1: float
  y0: float
  y1: float


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
  """The objects of a uint8 [S, S, 3] image, in raster order of their first pixel."""
  rgb = np.asarray(image, np.float64) / 255.0
  size = rgb.shape[0]
  norm = np.linalg.norm(rgb, axis=-1)
  color_index = np.argmax(rgb @ _DIRECTIONS.T, axis=-1)                          # nearest direction
  coverage = (rgb @ _DIRECTIONS.T).max(axis=-1) / np.linalg.norm(
      np.array(list(shapes.COLORS.values()))[color_index] / 255.0, axis=-1)    # length along that colour
  foreground = (coverage > FOREGROUND) & (norm > 0)
  objects = []
  for k, name in enumerate(shapes.COLOR_NAMES):
    labels, count = ndimage.label(foreground & (color_index == k), structure=np.ones((3, 3)))
    for region in range(1, count + 1):
      mask = labels == region
      grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))   # the faint edge pixels too
      weights = np.where(grown & ((color_index == k) | ~foreground), np.clip(coverage, 0, 1), 0.0)
      area = weights.sum()
      if area < 0.05 * (shapes.OBJECT_SIZE * size) ** 2:
        continue                                                    # a speck, not an object
      ys, xs = np.nonzero(mask)
      unit = area / (shapes.OBJECT_SIZE * size) ** 2
      shape = min(_UNIT_AREAS, key=lambda s: abs(np.log(unit / _UNIT_AREAS[s])))
      yy, xx = np.mgrid[:size, :size] + 0.5
      objects.append(DetectedObject(
          shape, name, float((weights * xx).sum() / area / size), float((weights * yy).sum() / area / size),
          xs.min() / size, (xs.max() + 1) / size, ys.min() / size, (ys.max() + 1) / size))
  return objects


def _group_objects(objects, group: shapes.Group):
  return [o for o in objects if (o.shape, o.color) == (group.shape, group.color)]


def _position_holds(objects, scene: shapes.Scene) -> bool:
  first, second = (_group_objects(objects, g) for g in scene.groups)
  if not first or not second:
    return False
  if scene.relation == "left of":
    return bool(max(o.x1 for o in first) <= min(o.x0 for o in second))
  return bool(max(o.y1 for o in first) <= min(o.y0 for o in second))


def check_image(image: np.ndarray, scene: shapes.Scene) -> dict[str, bool]:
  """Per-attribute correctness of `image` for the prompt `scene` (see the module docstring); "position"
  is None for one-group prompts."""
  objects = detect_objects(image)
  wanted = [(g.shape, g.color) for g in scene.groups for _ in range(g.count)]
  found = [(o.shape, o.color) for o in objects]
  result = dict(objects=len(found) == len(wanted),   # plain bools (JSON reports)
                colors=sorted(c for _, c in found) == sorted(c for _, c in wanted),
                shapes=sorted(s for s, _ in found) == sorted(s for s, _ in wanted),
                counting=all(len(_group_objects(objects, g)) == g.count for g in scene.groups),
                binding=sorted(found) == sorted(wanted),
                position=_position_holds(objects, scene) if scene.relation != "none" else None)
  result["all"] = result["binding"] and result["position"] is not False
  return result


_PHRASE = r"(a|two) (\w+) (\w+?)(s?)"


def parse_caption(text: str) -> shapes.Scene | None:
  """The scene a caption describes ("two red circles left of a blue square"), or None if it is not one."""
  text = " ".join(text.strip().lower().split())
  for relation in ("left of", "above", "none"):
    m = re.fullmatch(rf"{_PHRASE} {relation} {_PHRASE}" if relation != "none" else _PHRASE, text)
    if not m:
      continue
    phrases = [m.groups()[i:i + 4] for i in range(0, len(m.groups()), 4)]
    if any((det == "a") != (plural == "") for det, _, _, plural in phrases):
      return None                 # "a red circles", "two red circle"
    try:
      return shapes.Scene(tuple(shapes.Group(shape, color, 1 if det == "a" else 2)
                                for det, color, shape, _ in phrases), relation)
    except ValueError:            # an unknown shape or colour, or two groups of one kind
      return None
  return None


def check_caption(text: str, scene: shapes.Scene) -> dict[str, bool]:
  """Captioning: exact match of the described scene, and its attributes against the image's scene."""
  parsed = parse_caption(text)
  if parsed is None:
    return dict(parsed=False, colors=False, shapes=False, counting=False, position=False, exact=False)

  def kinds(s):
    return sorted((g.shape, g.color) for g in s.groups)
  return dict(parsed=True,
              colors=sorted(g.color for g in parsed.groups) == sorted(g.color for g in scene.groups),
              shapes=sorted(g.shape for g in parsed.groups) == sorted(g.shape for g in scene.groups),
              counting=kinds(parsed) == kinds(scene) and all(
                  a.count == b.count for a, b in zip(sorted(parsed.groups, key=lambda g: (g.shape, g.color)),
                                                     sorted(scene.groups, key=lambda g: (g.shape, g.color)))),
              position=parsed.relation == scene.relation,
              exact=parsed == scene)


def accuracy(results: list[dict]) -> dict[str, float]:
  """Mean of each attribute over the results where it applies."""
  keys = results[0].keys() if results else ()
  out = {}
  for key in keys:
    values = [r[key] for r in results if r[key] is not None]
    out[key] = float(np.mean(values)) if values else float("nan")
  return out
