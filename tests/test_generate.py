"""The generate API and command line on a tiny trained run: every mode's outputs, params-only loading,
and bad input."""
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tfusion import generate, sharding
from tfusion.data import sequence
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.training import trainer
from tests.helpers import CLIP_TOKENIZER, REPO, clip_config_dict, random_clip_params, tiny_run_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("gen") / "run")
  trainer.train_and_evaluate(tiny_run_config(data_dir, sample_every=100, eval_every=6, eval_examples=2), workdir)
  return workdir


def cli_args(workdir, out, **overrides):
  values = dict(workdir=workdir, step=None, weights="ema", mode="image", prompt=None, prompt_file=None, image=None, test_examples=0,
                out=out, batch_size=8, tensor_parallelism=0, seed=0, diffusion_steps=3, sampler="ddpm", ddim_eta=0.0,
                cfg_scale=3.0, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=6, max_images=1,
                image_temperature=1.0, image_top_k=0)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def test_image_mode_writes_pngs_grid_and_summary(run_dir, tmp_path):
  out = str(tmp_path / "out")
  summary = generate.run(cli_args(run_dir, out, prompt=["a red circle", "two blue squares"], batch_size=1))
  assert [o["image"] for o in summary["outputs"]] == ["image_000.png", "image_001.png"]
  assert np.asarray(Image.open(os.path.join(out, "image_001.png"))).shape == (16, 16, 3)
  assert Image.open(os.path.join(out, "grid.png")).size == (4 * 128, 128 + 40)
  saved = json.load(open(os.path.join(out, "generations.json")))
  assert saved["options"]["cfg_scale"] == 3.0 and saved["outputs"][0]["prompt"] == "a red circle"


def test_tensor_parallelism_splits_the_model_and_draws_the_same_images(run_dir, tmp_path, monkeypatch):
  meshes, load = [], sampler_lib.load

  def recording(workdir, step, mesh, **kwargs):
    meshes.append(mesh)
    return load(workdir, step, mesh, **kwargs)
  monkeypatch.setattr(sampler_lib, "load", recording)
  prompts = ["a red circle", "two blue squares"]
  generate.run(cli_args(run_dir, str(tmp_path / "default"), prompt=prompts))
  generate.run(cli_args(run_dir, str(tmp_path / "split"), prompt=prompts, tensor_parallelism=2))
  assert meshes[0] is None and dict(meshes[1].shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  for name in ("image_000.png", "image_001.png"):      # float rounding may move a pixel by one level
    default, split = (np.asarray(Image.open(tmp_path / d / name), np.int16) for d in ("default", "split"))
    assert np.abs(default - split).max() <= 1
  with pytest.raises(ValueError, match="tensor_parallelism = 4 must divide the 8 devices and the model's 2 attention"):
    generate.run(cli_args(run_dir, str(tmp_path / "bad"), prompt=prompts, tensor_parallelism=4))


def test_caption_mode_from_png_files_and_test_examples(run_dir, tmp_path):
  sampler = sampler_lib.load(run_dir)
  pngs = []
  for i, image in enumerate(sampler.text_to_image(["", ""], decoding.SamplingOptions(diffusion_steps=2),
                                                  jax.random.key(0))):
    pngs.append(str(tmp_path / f"in{i}.png"))
    Image.fromarray(image).save(pngs[-1])
  summary = generate.run(cli_args(run_dir, str(tmp_path / "out"), mode="caption", image=pngs, test_examples=2))
  assert [o["image"] for o in summary["outputs"]][:2] == pngs
  assert summary["outputs"][2]["image"].startswith("test[0]: ")
  assert len(summary["outputs"]) == 4 and all(isinstance(o["caption"], str) for o in summary["outputs"])
  assert os.path.exists(tmp_path / "out" / "captioned.png")


def test_text_and_interleaved_modes(run_dir, tmp_path):
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("The module\n\nA function\n")
  text = generate.run(cli_args(run_dir, str(tmp_path / "t"), mode="text", prompt_file=str(prompt_file),
                               temperature=1.0, top_k=50))
  assert [o["prompt"] for o in text["outputs"]] == ["The module", "A function"]
  mixed = generate.run(cli_args(run_dir, str(tmp_path / "i"), mode="interleaved", prompt=["Shapes:"],
                                max_images=2, temperature=1.0))
  parts = mixed["outputs"][0]["parts"]
  assert all(set(p) in ({"text"}, {"image"}) for p in parts)
  for p in parts:
    if "image" in p:
      assert os.path.exists(tmp_path / "i" / p["image"])


def test_load_restores_only_the_saved_params_bit_for_bit(run_dir):
  """The EMA of the params by default, the raw params on request, each equal to what the checkpoint holds."""
  sampler = sampler_lib.load(run_dir, step=3)
  raw = sampler_lib.load(run_dir, step=3, weights="raw")
  assert (sampler.weights, raw.weights) == ("ema", "raw")
  saved = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "checkpoints", "3", "state"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sampler.params), saved["ema_params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw.params), saved["params"])
  leaf = lambda p: np.asarray(p["lm_head"]["kernel"])  # noqa: E731
  assert not np.array_equal(leaf(sampler.params), leaf(raw.params))
  latest = sampler_lib.load(run_dir)
  assert not np.array_equal(leaf(latest.params), leaf(sampler.params))   # step 6, not 3
  with pytest.raises(ValueError, match="weights = 'best': one of"):
    sampler_lib.load(run_dir, weights="best")


def test_bad_inputs_are_named(run_dir, tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    sampler_lib.load(str(tmp_path / "nowhere"))
  empty = tmp_path / "no_ckpt"
  empty.mkdir()
  for name in ("config.json", "tokenizer.model"):
    (empty / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    sampler_lib.load(str(empty))
  with pytest.raises(ValueError, match=r"no checkpoint for step 99 .* saved steps: \[3, 6\]"):
    sampler_lib.load(run_dir, step=99)
  wrong_size = str(tmp_path / "big.png")
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(wrong_size)
  with pytest.raises(ValueError, match=r"this model reads 16x16"):
    generate.run(cli_args(run_dir, out, mode="caption", image=[wrong_size]))
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot read image .*broken.png"):
    generate.run(cli_args(run_dir, out, mode="caption", image=[str(broken)]))
  with pytest.raises(ValueError, match="needs --image"):
    generate.run(cli_args(run_dir, out, mode="caption"))
  with pytest.raises(ValueError, match="prompts must not be empty"):
    generate.run(cli_args(run_dir, out, mode="text", prompt=[" "]))
  with pytest.raises(ValueError, match="needs --prompt"):
    generate.run(cli_args(run_dir, out, mode="image"))
  with pytest.raises(ValueError, match="sampler 'euler' is unknown"):
    generate.run(cli_args(run_dir, out, prompt=["a red circle"], sampler="euler"))


def test_command_line(run_dir, tmp_path):
  out = str(tmp_path / "cli")
  command = [sys.executable, "-m", "tfusion.generate", f"--workdir={run_dir}", "--mode=image", "--prompt=a red circle",
             "--diffusion_steps=2", f"--out={out}"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.exists(os.path.join(out, "image_000.png")) and "generations.json" in result.stdout
  bad = subprocess.run(command[:-1] + ["--sampler=euler", f"--out={out}"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
  assert bad.returncode != 0 and "sampler" in bad.stderr


def test_batches_are_full_size_so_one_compilation_serves_all(run_dir, tmp_path, monkeypatch):
  sizes = []
  text_to_image = sampler_lib.Sampler.text_to_image

  def recording(self, captions, options, key):
    sizes.append(len(captions))
    return text_to_image(self, captions, options, key)
  monkeypatch.setattr(sampler_lib.Sampler, "text_to_image", recording)
  prompts = ["a red circle", "a blue square", "two green triangles"]
  summary = generate.run(cli_args(run_dir, str(tmp_path / "b"), prompt=prompts, batch_size=2, diffusion_steps=2))
  assert sizes == [2, 2] and [o["prompt"] for o in summary["outputs"]] == prompts
  assert len(os.listdir(tmp_path / "b")) == 3 + 2        # 3 images, grid.png, generations.json


# ---- python -m tfusion.evaluate on the same run. -------------------------------------------------
def test_text_perplexity_counts_every_held_out_target(run_dir):
  from tfusion.evaluation import suite   # pylint: disable=import-outside-toplevel
  sampler = sampler_lib.load(run_dir)
  docs = suite.held_out_documents(sampler.config, sampler.tokenizer)
  result = suite.text_perplexity(sampler, docs, rows_per_batch=8)
  # Every document gives len + 1 targets ([BOS ids] -> [ids EOS]), minus one per extra row it continues into.
  model, layout = sampler.model, sampler.spec.layout
  rows = suite.text_rows(docs, layout, sequence.SpecialIds.of(sampler.tokenizer), 1000)
  assert result["text_targets"] == sum(int(r["text_loss_mask"].sum()) for r in rows)
  assert sum(len(d) + 1 for d in docs) - len(rows) <= result["text_targets"] <= sum(len(d) + 1 for d in docs)
  assert 1 < result["perplexity"] < sampler.tokenizer.vocab_size * 2     # a 6-step model: near uniform
  # The same computation by hand, one row at a time, without the mesh.
  import optax   # pylint: disable=import-outside-toplevel
  total, params, apply = 0.0, jax.device_get(sampler.params), jax.jit(model.apply)
  for r in rows:
    logits, _ = apply({"params": params}, *[r[k][None] for k in (
        "tokens", "segment_ids", "positions", "image_ids", "latents", "t_max")])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], r["tokens"][1:])
    total += float((ce * r["text_loss_mask"][:-1]).sum())
  assert result["perplexity"] == pytest.approx(np.exp(total / result["text_targets"]), rel=1e-4)


def test_held_out_image_loss_is_the_training_objective_at_fixed_timesteps(run_dir):
  from tfusion import diffusion   # pylint: disable=import-outside-toplevel
  from tfusion.evaluation import suite   # pylint: disable=import-outside-toplevel
  from tfusion.data import shapes   # pylint: disable=import-outside-toplevel
  sampler = sampler_lib.load(run_dir)
  test = shapes.load_shapes(sampler.config.data.data_dir, "test", sampler.config.data.image_size)
  examples = test.__getitems__(list(range(5)))
  result = suite.held_out_image_loss(sampler, examples, jax.random.key(3), timesteps=(200, 800), rows_per_batch=2)
  assert set(result) == {"eps_mse", "eps_mse_t200", "eps_mse_t800"}
  assert result["eps_mse"] == pytest.approx((result["eps_mse_t200"] + result["eps_mse_t800"]) / 2)
  assert result == suite.held_out_image_loss(sampler, examples, jax.random.key(3), (200, 800), rows_per_batch=2)
  # By hand, one document per row: noise each image at t with the same per-row noise, MSE of the predicted eps.
  model, layout = sampler.model, sampler.spec.layout
  special = sequence.SpecialIds.of(sampler.tokenizer)
  rows = suite.whole_document_rows([sequence.image_caption_document(
      sampler.tokenizer.encode(e["caption"].decode()), x, True, special, 1000, 1000)
      for e, x in zip(examples, sampler.encode_images(np.stack([e["image"] for e in examples])))],
      layout, special, 1000)
  assert sum(int(r["image_valid"].sum()) for r in rows) == 5 and len(rows) > 1
  ab = diffusion.make_alpha_bar("cosine", 1000)[200]
  shards = sharding.data_shards(sampler.mesh)
  errors, per_batch = [], -(-2 // shards) * shards     # rows_per_batch, rounded up to the mesh
  for i, row in enumerate(rows):                                 # noise is drawn per batch of rows
    start = i // per_batch * per_batch
    eps = jax.random.normal(jax.random.fold_in(jax.random.key(3), start), (per_batch, *row["latents"].shape))
    eps = np.asarray(eps)[i - start]
    x_t = np.sqrt(ab) * row["latents"] + np.sqrt(1 - ab) * eps
    _, output = model.apply({"params": jax.device_get(sampler.params)}, *[row[k][None] for k in (
        "tokens", "segment_ids", "positions", "image_ids")], x_t[None], np.full((1, layout.max_images), 200))
    assert model.cfg.prediction == "v"                           # eps = sqrt(a) v + sqrt(1 - a) x_t
    eps_hat = np.sqrt(ab) * np.asarray(output[0]) + np.sqrt(1 - ab) * x_t
    errors += list(np.mean(np.square(eps_hat - eps), axis=(1, 2, 3))[row["image_valid"]])
  assert result["eps_mse_t200"] == pytest.approx(np.mean(errors), rel=1e-4)


def test_training_evaluates_every_eval_every_steps(run_dir):
  from tfusion.metrics import read_metrics   # pylint: disable=import-outside-toplevel
  evals = [m for m in read_metrics(run_dir) if "eval/text/perplexity" in m]
  assert [m["step"] for m in evals] == [6]
  assert evals[0]["eval/image_to_text/examples"] == 2 and evals[0]["eval/text_to_image/reference_all"] == 1.0
  assert 0 < evals[0]["eval/image_loss/eps_mse_t900"] < evals[0]["eval/image_loss/eps_mse_t100"]
  assert 1 < evals[0]["eval/text/perplexity"] < 2 * 512


def test_evaluate_command_writes_a_report(run_dir, tmp_path):
  from tfusion.evaluation import clip   # pylint: disable=import-outside-toplevel
  clip_config = clip_config_dict()
  clip.save_clip(str(tmp_path / "clip"), random_clip_params(clip.config_from_dict(clip_config)), clip_config,
                 CLIP_TOKENIZER)
  done = subprocess.run([sys.executable, "-m", "tfusion.evaluate", "--workdir", run_dir, "--num_examples", "4",
                         "--eval_clip", str(tmp_path / "clip")], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.load(open(os.path.join(run_dir, "eval", "step_6.json")))
  assert report["step"] == 6 and report["image_to_text"]["examples"] == 4
  assert 0 <= report["image_to_text"]["cider"] and 0 <= report["image_to_text"]["shapes_exact"] <= 1
  assert report["text_to_image"]["reference_all"] == 1.0           # the checker reads the true images
  assert set(report["text_to_image"]) >= {f"shapes_{k}" for k in ("objects", "colors", "binding", "all")}
  assert json.loads(done.stdout)["eval/text/perplexity"] == report["text"]["perplexity"]
  assert 0 <= report["text_to_image"]["clip_score"] <= 100 and "fid" not in report["text_to_image"]


# ---- python -m tfusion.export and tfusion.load. ---------------------------------------------------
def test_export_round_trip_generates_what_the_run_generates(run_dir, tmp_path):
  import safetensors.numpy   # pylint: disable=import-outside-toplevel
  import tfusion   # pylint: disable=import-outside-toplevel
  from tfusion import export   # pylint: disable=import-outside-toplevel
  out = export.export(run_dir, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "model.safetensors", "params", "tokenizer.model"]
  run, exported = sampler_lib.load(run_dir), tfusion.load(out)
  assert exported.step == run.step == 6 and exported.weights == run.weights == "ema"
  flat = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  want = export.flat_params(run.params)
  assert flat.keys() == want.keys() and all(np.array_equal(flat[k], want[k]) for k in want)
  options = decoding.SamplingOptions(diffusion_steps=3, max_new_tokens=4)
  key = jax.random.key(3)
  images = np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(2)])
  assert exported.caption(images, options, key) == run.caption(images, options, key)
  np.testing.assert_array_equal(exported.text_to_image(["a red circle"], options, key),
                                run.text_to_image(["a red circle"], options, key))
  with pytest.raises(FileExistsError, match="already holds an export"):
    export.export(run_dir, out)

  raw = tfusion.load(export.export(run_dir, str(tmp_path / "raw"), weights="raw"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw.params),
               jax.device_get(sampler_lib.load(run_dir, weights="raw").params))
  half = tfusion.load(export.export(run_dir, str(tmp_path / "bf16"), dtype="bfloat16"))
  assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {jax.numpy.dtype("bfloat16")}
  assert len(half.caption(images, options, key)) == 2
  with pytest.raises(FileNotFoundError, match="not a tfusion export"):
    tfusion.load(str(tmp_path))
