"""Shapes dataset: captions, rendering geometry, the TFDS builder round trip and its caching."""
import os

import numpy as np
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from tfusion.data import shapes
from tfusion.data.shapes import Group, Scene

SIZE = 16   # smallest allowed image size keeps the full builds fast


def color_mask(image: np.ndarray, color: str) -> np.ndarray:
  """[S, S] bool: pixels at least half covered by `color` (anti-aliased edges keep the hue)."""
  rgb = np.asarray(shapes.COLORS[color], np.float32)
  pixels = image.astype(np.float32)
  coverage = pixels.max(-1) / 255.0
  with np.errstate(invalid="ignore", divide="ignore"):
    hue_match = np.all(np.abs(pixels / np.maximum(coverage, 1e-6)[..., None] - rgb) < 40, -1)
  return (coverage >= 0.5) & hue_match


def num_blobs(mask: np.ndarray) -> int:
  return ndimage.label(mask)[1]


def random_scenes(n: int, seed: int):
  rng = np.random.default_rng(seed)
  return [shapes.sample_scene(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Scenes and captions

@pytest.mark.parametrize("scene, caption", [
    (Scene((Group("circle", "red", 1),), "none"), "a red circle"),
    (Scene((Group("square", "blue", 2),), "none"), "two blue squares"),
    (Scene((Group("circle", "red", 2), Group("square", "blue", 1)), "left of"),
     "two red circles left of a blue square"),
    (Scene((Group("triangle", "green", 1), Group("circle", "yellow", 2)), "above"),
     "a green triangle above two yellow circles"),
    (Scene((Group("triangle", "red", 2), Group("triangle", "green", 2)), "above"),
     "two red triangles above two green triangles"),
])
def test_caption_for(scene, caption):
  assert shapes.caption_for(scene) == caption


def test_public_constants():
  assert shapes.SHAPES == ("circle", "square", "triangle")
  assert list(shapes.COLORS) == ["red", "green", "blue", "yellow"]
  assert shapes.RELATIONS == ("none", "left of", "above")
  rgbs = np.array(list(shapes.COLORS.values()))
  distances = np.linalg.norm(rgbs[:, None] - rgbs[None], axis=-1)
  assert distances[~np.eye(len(rgbs), dtype=bool)].min() >= 200


@pytest.mark.parametrize("make", [
    lambda: Group("hexagon", "red", 1),
    lambda: Group("circle", "purple", 1),
    lambda: Group("circle", "red", 3),
    lambda: Scene((Group("circle", "red", 1),), "left of"),
    lambda: Scene((Group("circle", "red", 1), Group("square", "red", 1)), "none"),
    lambda: Scene((Group("circle", "red", 1), Group("circle", "red", 2)), "above"),
])
def test_invalid_scenes_raise(make):
  with pytest.raises(ValueError):
    make()


def test_sample_scene_covers_every_attribute():
  scenes = random_scenes(2000, seed=0)
  groups = [g for s in scenes for g in s.groups]
  assert {g.shape for g in groups} == set(shapes.SHAPES)
  assert {g.color for g in groups} == set(shapes.COLORS)
  assert {g.count for g in groups} == {1, 2}
  relations = [s.relation for s in scenes]
  assert set(relations) == set(shapes.RELATIONS)
  assert 0.4 < relations.count("none") / len(scenes) < 0.6
  for s in scenes:   # Scene validates itself; re-check the two-group rule explicitly
    if len(s.groups) == 2:
      a, b = s.groups
      assert (a.shape, a.color) != (b.shape, b.color)
  # The caption determines the scene: distinct scenes get distinct captions.
  by_caption = {shapes.caption_for(s): s for s in scenes}
  assert len(by_caption) == len(set(scenes))


def test_sample_scene_deterministic():
  assert random_scenes(50, seed=3) == random_scenes(50, seed=3)
  assert random_scenes(50, seed=3) != random_scenes(50, seed=4)


# ----------------------------------------------------------------------------------------------
# Rendering

@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("relation, axis", [("left of", 1), ("above", 0)])
def test_render_relation_puts_groups_in_halves(size, relation, axis):
  scene = Scene((Group("circle", "red", 2), Group("triangle", "blue", 1)), relation)
  for seed in range(10):
    image = shapes.render_scene(scene, size, np.random.default_rng(seed))
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    red, blue = color_mask(image, "red"), color_mask(image, "blue")
    assert num_blobs(red) == 2 and num_blobs(blue) == 1
    first_half = np.arange(size) < size // 2
    coords = np.indices((size, size))[axis]
    assert first_half[coords[red]].all() and not first_half[coords[blue]].any()
    # Every lit pixel of a colour (anti-aliased edges included) stays in its half.
    lit_red = image[..., 0] > 0
    lit_blue = image[..., 2] > 0
    assert first_half[coords[lit_red]].all() and not first_half[coords[lit_blue]].any()
    assert ndimage.center_of_mass(red)[axis] < size / 2 < ndimage.center_of_mass(blue)[axis]


@pytest.mark.parametrize("size", [16, 32])
def test_render_objects_never_overlap(size):
  rng = np.random.default_rng(1)
  for scene in random_scenes(300, seed=2):
    image = shapes.render_scene(scene, size, rng)
    assert num_blobs(image.max(-1) >= 128) == sum(g.count for g in scene.groups), scene
    for g in scene.groups:
      assert num_blobs(color_mask(image, g.color)) >= g.count, scene


def test_render_stays_inside_the_image():
  size, margin = 64, int(shapes.MARGIN * 64)   # objects keep >= 3.2 px from the border
  rng = np.random.default_rng(5)
  for scene in random_scenes(300, seed=6):
    image = shapes.render_scene(scene, size, rng)
    border = np.ones((size, size), bool)
    border[margin:-margin, margin:-margin] = False
    assert not image[border].any(), scene


def test_render_object_size_and_antialiasing():
  size = 64
  scene = Scene((Group("square", "green", 1),), "none")
  image = shapes.render_scene(scene, size, np.random.default_rng(0))
  area = (image[..., 1] / 255.0).sum()
  assert abs(np.sqrt(area) / size - shapes.OBJECT_SIZE) < 0.02
  greens = np.unique(image[..., 1])
  assert ((greens > 0) & (greens < 255)).any()   # soft edges
  assert not image[..., [0, 2]].any()            # pure colour, no fringes of other channels


def test_render_deterministic_and_validates_size():
  scene = Scene((Group("square", "yellow", 2), Group("circle", "green", 1)), "above")
  a = shapes.render_scene(scene, 32, np.random.default_rng(9))
  b = shapes.render_scene(scene, 32, np.random.default_rng(9))
  np.testing.assert_array_equal(a, b)
  for bad in (8, 12, 20, 33):
    with pytest.raises(ValueError, match=str(bad)):
      shapes.render_scene(scene, bad, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# TFDS builder

@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
  """One full-size build (20k + 1k examples at 16 px), shared by the round-trip tests."""
  data_dir = str(tmp_path_factory.mktemp("shapes_full"))
  shapes.load_shapes(data_dir, "train", image_size=SIZE)
  return data_dir


def check_example(example):
  assert set(example) == {"image", "caption", "shape", "color", "count", "relation"}
  image = example["image"]
  assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
  assert isinstance(example["caption"], bytes)
  scene = shapes.scene_from_example(example)
  assert example["caption"].decode() == shapes.caption_for(scene)
  for key in ("shape", "color", "count"):
    assert example[key].dtype == np.int32 and example[key].shape == (2,)
  if len(scene.groups) == 1:
    assert list(example["shape"][1:]) == [-1] and list(example["color"][1:]) == [-1]
    assert list(example["count"][1:]) == [0]
  # The stored image shows what the attributes say.
  assert num_blobs(image.max(-1) >= 128) == sum(g.count for g in scene.groups)
  return scene


@pytest.mark.parametrize("split, length", [("train", 20_000), ("test", 1_000)])
def test_builder_round_trip(full_dir, split, length):
  source = shapes.load_shapes(full_dir, split, image_size=SIZE)
  assert len(source) == length
  scenes = [check_example(source[i]) for i in range(0, length, length // 100)]
  assert len({s.relation for s in scenes}) == 3
  assert check_example(source[length - 1])


def test_splits_differ_and_tfds_data_source_reads(full_dir):
  train = shapes.load_shapes(full_dir, "train", image_size=SIZE)
  test = shapes.load_shapes(full_dir, "test", image_size=SIZE)
  assert [train[i]["caption"] for i in range(50)] != [test[i]["caption"] for i in range(50)]
  builder = shapes.Shapes(config=shapes.ShapesConfig.for_size(SIZE), data_dir=full_dir)
  assert builder.info.splits["train"].num_examples == 20_000
  assert builder.info.file_format.value == "array_record"
  assert tfds.builder_cls("tfusion_shapes") is shapes.Shapes


def test_builder_deterministic(tmp_path):
  sources = [shapes.load_shapes(str(tmp_path / d), "train", image_size=SIZE,
                                max_examples_per_split=200) for d in ("a", "b")]
  assert len(sources[0]) == len(sources[1]) == 200
  for i in range(200):
    a, b = sources[0][i], sources[1][i]
    assert a["caption"] == b["caption"]
    np.testing.assert_array_equal(a["image"], b["image"])
    for key in ("shape", "color", "count", "relation"):
      np.testing.assert_array_equal(a[key], b[key])


def test_load_shapes_generates_once(tmp_path, caplog, monkeypatch):
  data_dir = str(tmp_path)
  caplog.set_level("INFO")
  shapes.load_shapes(data_dir, "test", image_size=SIZE, max_examples_per_split=20)
  assert "Generating tfusion_shapes/16px" in caplog.text
  version_dir = tmp_path / "tfusion_shapes" / "16px" / "1.0.0"
  files = sorted(version_dir.iterdir())
  assert any(f.name.startswith("tfusion_shapes-train.array_record") for f in files)
  mtimes = [os.stat(f).st_mtime_ns for f in files]

  caplog.clear()
  def no_generation(*args, **kwargs):
    raise AssertionError("regenerated")
  monkeypatch.setattr(shapes.Shapes, "download_and_prepare", no_generation)
  source = shapes.load_shapes(data_dir, "train", image_size=SIZE, max_examples_per_split=20)
  assert len(source) == 20
  assert "Generating" not in caplog.text
  assert sorted(version_dir.iterdir()) == files
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  # A truncated data_dir is not mistaken for the full dataset.
  with pytest.raises(ValueError, match="holds 20 train examples"):
    shapes.load_shapes(data_dir, "train", image_size=SIZE)


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="'validation'"):
    shapes.load_shapes(str(tmp_path), "validation")
  for bad in (8, 12, 20):
    with pytest.raises(ValueError, match=str(bad)):
      shapes.load_shapes(str(tmp_path), "train", image_size=bad)
    with pytest.raises(ValueError, match=str(bad)):
      shapes.ShapesConfig(name=f"{bad}px", image_size=bad)
  assert not any(tmp_path.iterdir())   # nothing generated for bad arguments
