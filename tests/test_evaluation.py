"""Evaluation metrics on inputs with known answers."""
import dataclasses

import numpy as np
import pytest

from tfusion.data import shapes
from tfusion.evaluation import shapes_checker as checker


def test_scenes(size, n):
  """The first n test-split scenes and images, drawn exactly as the TFDS builder draws them."""
  rng = np.random.default_rng(shapes.SPLITS["test"][0])
  scenes, images = [], []
  for _ in range(n):
    scenes.append(shapes.sample_scene(rng))
    images.append(shapes.render_scene(scenes[-1], size, rng))
  return scenes, images


test_scenes.__test__ = False


@pytest.mark.parametrize("size, n", [(16, 300), (32, 1000), (64, 200)])
def test_checker_scores_ground_truth_images(size, n):
  scenes, images = test_scenes(size, n)
  scores = checker.accuracy([checker.check_image(i, s) for i, s in zip(images, scenes)])
  assert scores["all"] >= 0.99 and min(scores.values()) >= 0.99, scores


def test_checker_rejects_images_of_other_scenes():
  scenes, images = test_scenes(32, 300)
  shuffled = checker.accuracy([checker.check_image(i, s) for i, s in zip(images, scenes[1:] + scenes[:1])])
  assert shuffled["all"] < 0.05 and shuffled["binding"] < 0.05
  blank = checker.check_image(np.zeros((32, 32, 3), np.uint8), scenes[0])
  assert not blank["objects"] and not blank["all"]


def one_change(scene, **change):
  group = dataclasses.replace(scene.groups[0], **change)
  return shapes.Scene((group, *scene.groups[1:]), scene.relation)


def test_each_attribute_catches_its_own_error():
  scene = shapes.Scene((shapes.Group("circle", "red", 2), shapes.Group("square", "blue", 1)), "left of")
  image = shapes.render_scene(scene, 32, np.random.default_rng(0))
  assert checker.check_image(image, scene) == dict(objects=True, colors=True, shapes=True, counting=True,
                                                   binding=True, position=True, all=True)
  wrong_color = checker.check_image(image, one_change(scene, color="green"))
  assert (wrong_color["colors"], wrong_color["shapes"], wrong_color["binding"]) == (False, True, False)
  wrong_shape = checker.check_image(image, one_change(scene, shape="triangle"))
  assert (wrong_shape["colors"], wrong_shape["shapes"], wrong_shape["binding"]) == (True, False, False)
  wrong_count = checker.check_image(image, one_change(scene, count=1))
  assert (wrong_count["objects"], wrong_count["counting"], wrong_count["all"]) == (False, False, False)
  swapped = checker.check_image(image, shapes.Scene(scene.groups[::-1], "left of"))
  assert swapped["binding"] and swapped["position"] is False and not swapped["all"]
  above = checker.check_image(image, shapes.Scene(scene.groups, "above"))
  assert above["binding"] and not above["position"]
  single = shapes.Scene(scene.groups[1:], "none")
  alone = checker.check_image(shapes.render_scene(single, 32, np.random.default_rng(0)), single)
  assert alone["position"] is None and alone["all"]


def test_captions_parse_back_to_their_scenes():
  scenes, _ = test_scenes(16, 500)
  for scene in scenes:
    assert checker.parse_caption(shapes.caption_for(scene)) == scene
    assert checker.check_caption("  " + shapes.caption_for(scene).upper() + " ", scene)["exact"]
  for text in ("a purple circle", "a red circles", "two red circle", "a red circle left of a red circle",
               "a red circle beside a blue square", ""):
    assert checker.parse_caption(text) is None, text


def test_caption_attributes():
  scene = shapes.Scene((shapes.Group("circle", "red", 2), shapes.Group("square", "blue", 1)), "above")
  assert checker.check_caption("two red circles above a blue square", scene) == dict(
      parsed=True, colors=True, shapes=True, counting=True, position=True, exact=True)
  assert checker.check_caption("a red circle above a blue square", scene) == dict(
      parsed=True, colors=True, shapes=True, counting=False, position=True, exact=False)
  assert checker.check_caption("two red circles left of a blue square", scene)["position"] is False
  assert checker.check_caption("two green circles above a blue square", scene)["colors"] is False
  assert checker.check_caption("blue square", scene) == dict(parsed=False, colors=False, shapes=False,
                                                             counting=False, position=False, exact=False)
