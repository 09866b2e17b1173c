"""Evaluation metrics on inputs with known answers."""
import dataclasses
import os

import numpy as np
import pytest

from tfusion.data import shapes
from tfusion.evaluation import metrics, shapes_checker as checker
from tests.helpers import CLIP_TOKENIZER, clip_config_dict, random_clip_params, random_inception_params, tiny_run_config


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


# ---- Metrics. -------------------------------------------------------------------------------------
CIDER_REFERENCES = [
    ["a red circle", "one red circle", "a red round shape"],
    ["two blue squares left of a green triangle", "two blue squares to the left of a green triangle"],
    ["a yellow triangle above a red square", "a yellow triangle over a red square", "yellow triangle above red square"],
    ["a man riding a horse on a beach", "a person rides a horse along the shore"]]
CIDER_CANDIDATES = ["a red circle", "two blue squares left of a triangle", "a red square above a yellow triangle",
                    "a dog on a beach"]
# pycocoevalcap 1.2, Cider().compute_score on the same lower-cased, punctuation-free words.
CIDER_TOOLKIT = (3.8095673313576284, [3.893201398548391, 5.680413910713465, 4.418055975725914, 1.2465980404427432])


def test_cider_matches_the_coco_caption_toolkit():
  score, scores = metrics.cider_d(CIDER_CANDIDATES, CIDER_REFERENCES)
  assert score == pytest.approx(CIDER_TOOLKIT[0], abs=1e-12)
  np.testing.assert_allclose(scores, CIDER_TOOLKIT[1], atol=1e-12)
  # Punctuation and case do not count; a word order change does.
  assert metrics.cider_d(["A red, circle."] + CIDER_CANDIDATES[1:], CIDER_REFERENCES)[1][0] == pytest.approx(scores[0])
  assert metrics.cider_d(["circle red a"] + CIDER_CANDIDATES[1:], CIDER_REFERENCES)[1][0] < scores[0] / 2
  with pytest.raises(ValueError, match="4 candidates but 3 reference sets"):
    metrics.cider_d(CIDER_CANDIDATES, CIDER_REFERENCES[:3])


def test_frechet_distance_of_known_gaussians():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 5))
  sigma = a @ a.T + np.eye(5)
  mu = rng.standard_normal(5)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
  v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0])
  assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(9 + 4 + 1 + 0 + 4, abs=1e-9)
  # Invariant under a rotation of the feature space.
  q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
  b = rng.standard_normal((5, 5))
  sigma2 = b @ b.T
  want = metrics.frechet_distance(mu, sigma, -mu, sigma2)
  assert metrics.frechet_distance(q @ mu, q @ sigma @ q.T, -q @ mu, q @ sigma2 @ q.T) == pytest.approx(want, rel=1e-9)
  # From samples: the estimate approaches the closed form.
  x = rng.multivariate_normal(mu1, np.diag(v1), size=200_000)
  y = rng.multivariate_normal(mu2, np.diag(v2), size=200_000)
  assert metrics.frechet_distance(*metrics.gaussian_statistics(x), *metrics.gaussian_statistics(y)) == pytest.approx(
      18.0, rel=0.01)
  # From features directly, also with fewer samples than dimensions (singular covariances).
  for n, d in ((50, 5), (6, 40)):
    x, y = rng.standard_normal((n, d)), 2 * rng.standard_normal((n + 3, d)) + 1
    stats = metrics.frechet_distance(*metrics.gaussian_statistics(x), *metrics.gaussian_statistics(y))
    assert metrics.feature_frechet_distance(x, y) == pytest.approx(stats, rel=1e-7)
    assert abs(metrics.feature_frechet_distance(x, x)) < 1e-9
  with pytest.raises(ValueError, match=r"\(3, 5\) and \(3, 4\)"):
    metrics.feature_frechet_distance(x[:3, :5], y[:3, :4])


def test_clip_score_and_perplexity():
  image = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  text = np.array([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])    # cos 1, 0, -1 (clipped to 0)
  assert metrics.clip_score(image, text) == pytest.approx(100 / 3)
  assert metrics.clip_score(image, text, weight=2.5) == pytest.approx(2.5 / 3)
  assert metrics.perplexity(np.log(7.0) * 10, 10) == pytest.approx(7.0)


# ---- FID and CLIP score hooks on user weight files (random weights here). -------------------------------
class ImagesFor:
  """A stand-in sampler whose text_to_image returns given images (the plumbing under test is after sampling)."""

  def __init__(self, images):
    self.images = images

  def text_to_image(self, captions, options, key):
    assert len(captions) == len(self.images)
    return list(self.images)


def test_fid_and_clip_score_hooks_load_user_weights(tmp_path):
  import jax   # pylint: disable=import-outside-toplevel
  from tfusion import config as config_lib   # pylint: disable=import-outside-toplevel
  from tfusion.evaluation import clip, inception, suite   # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(inception.FidInception().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                                                                    np.float32))
  inception.save_inception_params(str(tmp_path / "fid.safetensors"), random_inception_params(abstract["params"]))
  clip_config = clip_config_dict()
  clip.save_clip(str(tmp_path / "clip"), random_clip_params(clip.config_from_dict(clip_config)), clip_config,
                 CLIP_TOKENIZER)
  config = config_lib.default_config()
  config.eval_inception_weights, config.eval_clip = str(tmp_path / "fid.safetensors"), str(tmp_path / "clip")
  scorers = suite.ImageScorers.from_config(config)

  scenes, images = test_scenes(32, 6)
  examples = [dict(image=i, caption=shapes.caption_for(s).encode()) for s, i in zip(scenes, images)]
  same = suite.image_report(ImagesFor(images), examples, None, None, scorers)
  features = inception.inception_features(scorers.inception_params, np.stack(images))
  assert same["shapes_all"] == 1.0 and abs(same["fid"]) < 1e-6 * np.trace(np.cov(features, rowvar=False))
  darker = suite.image_report(ImagesFor([i // 2 for i in images]), examples, None, None, scorers)
  assert darker["fid"] > 1.0 and darker["shapes_all"] < 1.0
  model = clip.load_clip(str(tmp_path / "clip"))
  want = metrics.clip_score(model.embed_images(np.stack(images)), model.embed_texts([e["caption"].decode()
                                                                                    for e in examples]))
  assert same["clip_score"] == pytest.approx(want, rel=1e-6) and darker["clip_score"] != pytest.approx(want)
  # Without weights neither number is reported; a bad file names its config field.
  assert {"fid", "clip_score"}.isdisjoint(suite.image_report(ImagesFor(images), examples, None, None))
  config.eval_inception_weights = str(tmp_path / "missing.safetensors")
  with pytest.raises(config_lib.ConfigError, match="config.eval_inception_weights: .*missing.safetensors"):
    suite.ImageScorers.from_config(config)
  (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  config.eval_inception_weights = str(tmp_path / "corrupt.safetensors")
  with pytest.raises(config_lib.ConfigError, match="config.eval_inception_weights: cannot load .*corrupt"):
    suite.ImageScorers.from_config(config)
  (tmp_path / "clip" / "tokenizer.json").write_text("{")
  config.eval_inception_weights = ""
  with pytest.raises(config_lib.ConfigError, match="config.eval_clip: cannot load"):
    suite.ImageScorers.from_config(config)


# ---- The ablation runner. -------------------------------------------------------------------------
def test_ablation_runner_on_a_two_by_two_toy(tmp_path):
  import ml_collections   # pylint: disable=import-outside-toplevel
  from tfusion import ablate   # pylint: disable=import-outside-toplevel
  ablation = ml_collections.ConfigDict()
  ablation.base = tiny_run_config(str(tmp_path / "tfds"), total_steps=2, sample_every=100, eval_examples=2)
  ablation.variants = ml_collections.ConfigDict({"lambda_1": {"diffusion": {"loss_weight": 1.0}},
                                                 "lambda_5": {"diffusion": {"loss_weight": 5.0}}})
  ablation.seeds = (0, 1)
  workdir = str(tmp_path / "ablation")
  assert ablate.cell_config(ablation, "lambda_1", 1).diffusion.loss_weight == 1.0
  for variant in ablation.variants:
    for seed in ablation.seeds[:1] if variant == "lambda_5" else ablation.seeds:
      assert ablate.run_cell(ablation, workdir, variant, seed) == (0, True)
  table = ablate.collect(ablation, workdir)
  assert table["lambda_1"]["seeds"] == [0, 1] and table["lambda_5"]["missing_seeds"] == [1]
  loss = table["lambda_1"]["numbers"]["final/loss"]
  assert loss["mean"] == pytest.approx(np.mean(loss["values"])) and loss["std"] == pytest.approx(
      np.std(loss["values"], ddof=1)) and loss["values"][0] != loss["values"][1]      # seeds differ
  flops = table["lambda_1"]["numbers"]["flops_6nd"]["mean"]
  assert flops == 6 * table["lambda_1"]["numbers"]["params"]["mean"] * 2 * 8 * 64
  assert "eval/text/perplexity" in table["lambda_5"]["numbers"]
  # lambda_5 against the baseline lambda_1, paired over the one seed both have.
  paired = table["lambda_5"]["paired"]
  assert paired["baseline"] == "lambda_1" and paired["seeds"] == [0] and "paired" not in table["lambda_1"]
  assert paired["differences"]["final/loss"]["values"] == [
      table["lambda_5"]["numbers"]["final/loss"]["values"][0] - loss["values"][0]]
  markdown = open(f"{workdir}/results.md").read()
  assert "| final/loss |" in markdown and "lambda_5 - lambda_1 (paired, 1 seeds)" in markdown
  # A finished cell is not rerun.
  before = os.path.getmtime(f"{workdir}/lambda_1/seed_0/metrics.jsonl")
  ablate.run_cell(ablation, workdir, "lambda_1", 0)
  assert os.path.getmtime(f"{workdir}/lambda_1/seed_0/metrics.jsonl") == before
  with pytest.raises(Exception, match="variants.lambda_1.model.no_such_field"):
    ablation.variants.lambda_1.model = ml_collections.ConfigDict({"no_such_field": 1})
    ablate.cell_config(ablation, "lambda_1", 0)


def test_a_signal_during_a_cell_stops_the_ablation(tmp_path, monkeypatch):
  """A cell's training that returns before its last step (SIGTERM: saved, status 0; Ctrl-C: 130) ends the
  ablation with that status instead of going on to the next cell."""
  import ml_collections   # pylint: disable=import-outside-toplevel
  from tfusion import ablate   # pylint: disable=import-outside-toplevel
  ablation = ml_collections.ConfigDict()
  ablation.base = tiny_run_config(str(tmp_path / "tfds"), total_steps=2)
  ablation.variants = ml_collections.ConfigDict({"a": {"diffusion": {"loss_weight": 1.0}},
                                                 "b": {"diffusion": {"loss_weight": 5.0}}})
  ablation.seeds = (0, 1)
  trained = []

  def train(config, directory, saved_step, status):
    trained.append(directory)
    os.makedirs(os.path.join(directory, "checkpoints", str(saved_step)))
    return status
  for saved_step, status, stopped in ((1, 0, 0), (1, 130, 130), (2, 0, None)):
    trained.clear()
    workdir = str(tmp_path / f"{saved_step}_{status}")
    monkeypatch.setattr(ablate.trainer, "train_and_evaluate",
                        lambda config, directory, s=saved_step, c=status: train(config, directory, s, c))
    assert ablate.run_all(ablation, workdir) == stopped
    assert len(trained) == (4 if stopped is None else 1)


def test_reference_denoisers_against_a_float64_computation():
  """suite.reference_eps: the mean training image as x0, and the ideal denoiser of the training set (softmax
  over -|x_t - sqrt(a) x_i|^2 / 2(1 - a) of the training latents x_i), written out in float64."""
  import jax.numpy as jnp
  from tfusion.evaluation import suite
  rng = np.random.default_rng(0)
  train = rng.standard_normal((50, 2, 2, 3))
  x0, eps = train[:3] + 0.01 * rng.standard_normal((3, 2, 2, 3)), rng.standard_normal((3, 2, 2, 3))
  for a in (0.999, 0.5, 0.01):
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    mean_eps, ideal_eps = suite.reference_eps(jnp.asarray(x_t, jnp.float32), jnp.float32(a),
                                                 jnp.asarray(train, jnp.float32))
    flat, data = x_t.reshape(3, -1), train.reshape(50, -1)
    logits = -((flat[:, None] - np.sqrt(a) * data[None]) ** 2).sum(-1) / (2 * (1 - a))
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    to_eps = lambda x0_hat: (flat - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ideal_eps).reshape(3, -1), to_eps(weights @ data), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(mean_eps).reshape(3, -1), to_eps(data.mean(0)), rtol=1e-4, atol=1e-4)
  # At a training image at low noise the ideal denoiser finds it: its eps is almost the true one, the mean
  # image's is far off.
  x_t = np.sqrt(0.999) * train[:3] + np.sqrt(0.001) * eps
  mean_eps, ideal_eps = suite.reference_eps(jnp.asarray(x_t, jnp.float32), jnp.float32(0.999),
                                               jnp.asarray(train, jnp.float32))
  assert np.mean((np.asarray(ideal_eps) - eps) ** 2) < 1e-3 < 10 < np.mean((np.asarray(mean_eps) - eps) ** 2)
