"""Coloured geometric shapes with templated captions: the embedded image-caption dataset.

A scene holds 1 or 2 groups; a group is 1 or 2 identical objects (one shape, one colour). Two
groups differ in shape or colour and stand in a relation: "left of" (group A in the left half, B in
the right half) or "above" (A in the top half, B in the bottom half). The caption fully determines
the content, e.g. "two red circles left of a blue square".

Everything is generated procedurally (no download) by a TFDS builder written in array_record, so
`tfds.data_source` reads it without TensorFlow. A data-source example (after decoding):
  image     [S, S, 3] uint8   black background, anti-aliased shapes
  caption   bytes             utf-8 caption (decode with .decode())
  shape     [2] int32         index into SHAPES per group slot, -1 for a missing 2nd group
  color     [2] int32         index into COLORS (insertion order), -1 for a missing 2nd group
  count     [2] int32         1 or 2, 0 for a missing 2nd group
  relation  int               index into RELATIONS
"""
import dataclasses
import io
import tempfile
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {   # insertion order = label ids
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
RELATIONS: tuple[str, ...] = ("none", "left of", "above")

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
MAX_GROUPS = 2
SPLITS: dict[str, tuple[int, int]] = {   # split -> (seed, number of examples)
    "train": (20240601, 20_000),
    "test": (20240602, 1_000),
}

# Geometry, as fractions of the image size.
OBJECT_SIZE = 0.28   # side of the square box every object fits in
MARGIN = 0.05        # least gap between an object and its cell edge (>= 2 * MARGIN between objects)
SUPERSAMPLE = 4      # drawn at 4x resolution, box-filtered down


# ----------------------------------------------------------------------------------------------
# Scenes and captions

@dataclasses.dataclass(frozen=True)
class Group:
  """`count` identical objects of one shape and one colour."""
  shape: str
  color: str
  count: int

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
    if self.color not in COLORS:
      raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")
    if self.count not in (1, 2):
      raise ValueError(f"group count must be 1 or 2, got {self.count!r}")


@dataclasses.dataclass(frozen=True)
class Scene:
  """1 or 2 groups; relation is "none" iff there is one group, else how groups[0] relates to [1]."""
  groups: tuple[Group, ...]
  relation: str

  def __post_init__(self):
    if not 1 <= len(self.groups) <= MAX_GROUPS:
      raise ValueError(f"a scene has 1 or 2 groups, got {len(self.groups)}")
    if self.relation not in RELATIONS:
      raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
    if (len(self.groups) == 1) != (self.relation == "none"):
      raise ValueError(f"relation {self.relation!r} does not fit {len(self.groups)} group(s)")
    if len(self.groups) == 2:
      a, b = self.groups
      if (a.shape, a.color) == (b.shape, b.color):
        raise ValueError(f"the two groups must differ in shape or colour, got {a} and {b}")


def _pick(u: float, n: int) -> int:
  """A uniform index in [0, n) from a uniform u in [0, 1)."""
  return min(int(u * n), n - 1)


def sample_scene(rng: np.random.Generator) -> Scene:
  """A uniformly random scene: 1 or 2 groups (distinct kinds), each of count 1 or 2."""
  kinds = [(shape, color) for shape in SHAPES for color in COLOR_NAMES]
  u = rng.random(6).tolist()   # a fixed number of draws per scene (one vector draw is fast)
  two_groups = u[0] < 0.5
  chosen = [_pick(u[1], len(kinds))]
  if two_groups:   # any other (shape, colour) kind, uniformly
    chosen.append((chosen[0] + 1 + _pick(u[2], len(kinds) - 1)) % len(kinds))
  groups = tuple(Group(*kinds[k], count=1 + _pick(u[3 + i], 2)) for i, k in enumerate(chosen))
  relation = RELATIONS[1 + _pick(u[5], len(RELATIONS) - 1)] if two_groups else "none"
  return Scene(groups, relation)


def _group_phrase(group: Group) -> str:
  if group.count == 1:
    return f"a {group.color} {group.shape}"
  return f"two {group.color} {group.shape}s"


def caption_for(scene: Scene) -> str:
  """"a red circle", "two red circles left of a blue square", "a green triangle above ..."."""
  phrases = [_group_phrase(g) for g in scene.groups]
  if scene.relation == "none":
    return phrases[0]
  return f"{phrases[0]} {scene.relation} {phrases[1]}"


# ----------------------------------------------------------------------------------------------
# Rendering

def check_image_size(image_size: int) -> None:
  """Image sizes are multiples of 8, at least 16; ValueError otherwise."""
  if not isinstance(image_size, (int, np.integer)) or image_size < 16 or image_size % 8:
    raise ValueError(f"image_size must be a multiple of 8 and >= 16, got {image_size!r}")


Box = tuple[float, float, float, float]   # x0, y0, x1, y1 in [0, 1] image fractions, y down


def _split(box: Box, axis: int) -> tuple[Box, Box]:
  """Halves of `box` along axis 0 (x: left, right) or 1 (y: top, bottom)."""
  x0, y0, x1, y1 = box
  if axis == 0:
    xm = (x0 + x1) / 2
    return (x0, y0, xm, y1), (xm, y0, x1, y1)
  ym = (y0 + y1) / 2
  return (x0, y0, x1, ym), (x0, ym, x1, y1)


def _object_centres(scene: Scene, rng: np.random.Generator) -> list[tuple[Group, float, float]]:
  """(group, cx, cy) per object, centres as image fractions.

  Each group gets a region (whole image, or the half its relation names); a count-2 group splits
  its region into two cells across the relation axis. Each object sits uniformly at random in its
  cell, keeping MARGIN from the cell edges, so objects never overlap and stay inside the image.
  """
  # Fixed draws per scene: a split axis for a lone count-2 group, and (u, v) per object slot.
  max_objects = 2 * MAX_GROUPS
  draws = rng.random(1 + 2 * max_objects).tolist()
  lone_axis, uv = _pick(draws[0], 2), list(zip(draws[1::2], draws[2::2]))
  if scene.relation == "none":
    regions, across = [(0.0, 0.0, 1.0, 1.0)], lone_axis
  else:
    axis = 0 if scene.relation == "left of" else 1
    regions, across = list(_split((0.0, 0.0, 1.0, 1.0), axis)), 1 - axis
  lo = MARGIN + OBJECT_SIZE / 2   # least distance from a cell edge to an object centre
  centres = []
  for group, region in zip(scene.groups, regions):
    cells = [region] if group.count == 1 else list(_split(region, across))
    for x0, y0, x1, y1 in cells:
      u, v = uv[len(centres)]
      centres.append((group, x0 + lo + u * (x1 - x0 - 2 * lo), y0 + lo + v * (y1 - y0 - 2 * lo)))
  return centres


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, rgb, cx: float, cy: float, d: float):
  """One object of side `d` centred at (cx, cy), all in canvas pixels."""
  x0, y0, x1, y1 = cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=rgb)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=rgb)
  else:   # upward triangle: apex top centre, base along the bottom edge
    draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=rgb)


def _render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
  check_image_size(image_size)
  big = image_size * SUPERSAMPLE
  canvas = Image.new("RGB", (big, big))
  draw = ImageDraw.Draw(canvas)
  for group, cx, cy in _object_centres(scene, rng):
    _draw_object(draw, group.shape, COLORS[group.color], cx * big, cy * big, OBJECT_SIZE * big)
  return canvas.reduce(SUPERSAMPLE)   # box filter: each pixel averages its 4x4 block


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """[S, S, 3] uint8 image of `scene`; rng places the objects (same draws for every size)."""
  return np.asarray(_render(scene, image_size, rng))


# ----------------------------------------------------------------------------------------------
# Attribute features <-> scenes

def scene_features(scene: Scene) -> dict[str, Any]:
  """The per-slot attribute features of `scene` (see module docstring); relation as its name."""
  shape = np.full([MAX_GROUPS], -1, np.int32)
  color = np.full([MAX_GROUPS], -1, np.int32)
  count = np.zeros([MAX_GROUPS], np.int32)
  for i, g in enumerate(scene.groups):
    shape[i], color[i], count[i] = SHAPES.index(g.shape), COLOR_NAMES.index(g.color), g.count
  return {"shape": shape, "color": color, "count": count, "relation": scene.relation}


def scene_from_example(example: Mapping[str, Any]) -> Scene:
  """Inverse of scene_features; relation may be its name or its RELATIONS index."""
  groups = tuple(
      Group(SHAPES[int(s)], COLOR_NAMES[int(c)], int(n))
      for s, c, n in zip(example["shape"], example["color"], example["count"]) if int(n) > 0)
  relation = example["relation"]
  if not isinstance(relation, str):
    relation = RELATIONS[int(relation)]
  return Scene(groups, relation)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
  """PNG encoding of an [S, S, 3] uint8 image (fast zlib level; these images compress well)."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buf = io.BytesIO()
  image.save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# TFDS builder

@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """One image size; the name must be f"{image_size}px" (it names the data directory)."""
  image_size: int = 32

  def __post_init__(self):
    check_image_size(self.image_size)
    if self.name != f"{self.image_size}px":
      raise ValueError(f"config name must be {self.image_size}px, got {self.name!r}")

  @classmethod
  def for_size(cls, image_size: int) -> "ShapesConfig":
    check_image_size(image_size)
    return cls(name=f"{image_size}px", image_size=image_size,
               description=f"{image_size}x{image_size} images")


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes dataset; splits "train" (20k) and "test" (1k), deterministic content."""
  name = "tfusion_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ShapesConfig.for_size(32), ShapesConfig.for_size(64)]
  # TFDS's own lookup of this file goes through the optional `importlib_resources` package.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size

    def slot():
      return tfds.features.Tensor(shape=(MAX_GROUPS,), dtype=np.int32)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3)),
            "caption": tfds.features.Text(),
            "shape": slot(),
            "color": slot(),
            "count": slot(),
            "relation": tfds.features.ClassLabel(names=RELATIONS),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    return {split: self._generate_examples(seed, n) for split, (seed, n) in SPLITS.items()}

  def _generate_examples(self, seed: int, num_examples: int):
    """Examples 0..num_examples-1, drawn in order from one generator seeded with `seed`."""
    image_size = self.builder_config.image_size
    rng = np.random.default_rng(seed)
    for i in range(num_examples):
      scene = sample_scene(rng)
      image = _render(scene, image_size, rng)
      yield i, {"image": png_bytes(image), "caption": caption_for(scene), **scene_features(scene)}


def load_shapes(data_dir: str, split: str, image_size: int = 32,
                max_examples_per_split: int | None = None):
  """Random-access data source of `split` ("train" or "test"), generated into data_dir once.

  Indexing gives a dict of decoded features (see module docstring); `len()` is the split size.
  max_examples_per_split (for tests) keeps only the first examples of every split, via TFDS's
  DownloadConfig; such a data_dir holds the smaller dataset for good, so give it its own dir.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
  check_image_size(image_size)
  name = f"{image_size}px"   # TFDS wants the registered instance for the predefined sizes
  config = name if name in Shapes.builder_configs else ShapesConfig.for_size(image_size)
  builder = Shapes(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    logging.info("Generating %s/%s into %s", Shapes.name, name, data_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as download_dir:   # nothing is downloaded
      builder.download_and_prepare(
          download_dir=download_dir, file_format="array_record",
          download_config=tfds.download.DownloadConfig(
              max_examples_per_split=max_examples_per_split))
    logging.info("Generated %s in %.1f s", builder.data_dir, time.perf_counter() - start)
  source = builder.as_data_source(split=split)
  expected = SPLITS[split][1]
  if max_examples_per_split is not None:
    expected = min(expected, max_examples_per_split)
  if len(source) != expected:
    raise ValueError(f"{builder.data_dir} holds {len(source)} {split} examples, not {expected}: "
                     "it was generated with another max_examples_per_split")
  return source
