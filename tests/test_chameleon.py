"""The Chameleon baseline's discrete image path (data.codec = vq): codes cached by encode_latents and prepared by
tfusion.prepare, rows of [BOS caption BOI codes EOI EOS] with the codes after the text vocabulary, training
with the LM loss alone, and generation / captioning / evaluation through the same APIs as Transfusion."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from tfusion import codecs, encode_latents, export, generate, prepare, train_vae
from tfusion.data import latent_cache, pipeline, prepared, sequence, shapes
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.metrics import read_metrics
from tfusion.training import trainer
from tests.helpers import tiny_run_config
from tests.test_generate import cli_args
from tests.test_prepare import prepare_config, prepared_mixture  # noqa: F401 (a fixture)
from tests.test_vq import tiny_vq_config

SPECIAL = sequence.SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)


def test_image_tokens_and_documents_hold_the_codes_after_the_text_vocabulary():
  codes = np.array([[0, 5], [15, 2]])
  np.testing.assert_array_equal(sequence.image_tokens(codes, 100, SPECIAL), [3, 100, 105, 115, 102, 4])
  np.testing.assert_array_equal(sequence.image_tokens(codes[..., None].astype(np.float32), 100, SPECIAL),
                                [3, 100, 105, 115, 102, 4])
  first, = sequence.discrete_image_caption_document([7, 8], codes, True, SPECIAL, 100)
  np.testing.assert_array_equal(first.ids, [1, 7, 8, 3, 100, 105, 115, 102, 4, 2])
  second, = sequence.discrete_image_caption_document([7, 8], codes, False, SPECIAL, 100)
  np.testing.assert_array_equal(second.ids, [1, 3, 100, 105, 115, 102, 4, 7, 8, 2])


def _code_sources(vocab=50, grid=2):
  rng = np.random.default_rng(0)
  examples = [(list(rng.integers(5, vocab, 3)), rng.integers(0, 16, (grid, grid, 1)).astype(np.float32))
              for _ in range(40)]
  texts = [rng.integers(5, vocab, n).astype(np.int32) for n in (5, 30, 9, 14) * 10]
  return [pipeline.Source("text", "text", texts, lambda ids: ids, 0.5),
          pipeline.Source("images", "image_caption", examples, lambda e: e, 0.5)]


def test_packed_discrete_rows_have_no_image_slots_and_the_loss_covers_the_codes():
  layout = sequence.RowLayout(32, (2, 2, 1), 1, discrete_images=True)
  mix = pipeline.MixOptions(caption_first_prob=1.0, num_timesteps=1000, image_first_max_t=500, seed=0,
                            image_token_offset=50)
  batch = next(pipeline.train_batches(_code_sources(), layout, SPECIAL, mix, 4, prefetch=0))
  assert batch["latents"].shape == (4, 0, 2, 2, 1) and batch["image_valid"].shape == (4, 0)
  assert not batch["image_ids"].any()
  tokens, mask = batch["tokens"], batch["text_loss_mask"]
  images = 0
  for r, l in zip(*np.nonzero(tokens == SPECIAL.boi)):
    assert (tokens[r, l + 1:l + 5] >= 50).all() and (tokens[r, l + 1:l + 5] < 66).all()
    assert tokens[r, l + 5] == SPECIAL.eoi and tokens[r, l + 6] == SPECIAL.eos
    assert mask[r, l:l + 6].all()          # BOI predicts the first code, ..., the last code predicts EOI
    images += 1
  assert images >= 3
  codes = (tokens >= 50) & (tokens < 66)
  assert codes.sum() == 4 * images         # codes appear only inside images


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, data_dir):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("vq") / "run")
  train_vae.train_vae(tiny_vq_config(data_dir), workdir)
  return workdir


def chameleon_config(data_dir, vq, cache, **top):  # noqa: F811
  c = tiny_run_config(data_dir, **top)
  c.data.codec, c.data.vae, c.data.latent_cache = "vq", vq, cache
  c.data.codebook_size, c.data.latent_downsample = 16, 4
  c.model.patch_size, c.model.qk_norm, c.model.norm_placement, c.z_loss_weight = 1, True, "branch_output", 1e-4
  c.sample.cfg_scale, c.sample.image_top_k = 2.0, 4
  return c


@pytest.fixture(scope="module")
def code_cache(vq_run, tmp_path_factory, data_dir):  # noqa: F811
  directory = str(tmp_path_factory.mktemp("codes"))
  encode_latents.encode_dataset(chameleon_config(data_dir, vq_run, directory))
  return directory


def test_code_cache_holds_the_vq_codes_of_every_image(code_cache, vq_run, data_dir):  # noqa: F811
  metadata = codecs.read_codec_metadata(code_cache)
  assert metadata["codec"] == "vq" and metadata["codebook_size"] == 16 and metadata["vae"] == vq_run
  assert 1 <= metadata["codes_used"] <= 16 and 1 <= metadata["code_perplexity"] <= 16
  source = latent_cache.LatentSource(code_cache, "test")
  images = np.stack([e["image"] for e in pipeline.take(shapes.load_shapes(data_dir, "test", 16), 4)])
  codec = codecs.vq_codec(vq_run)
  expected = codec.codes(images)
  assert expected.shape == (4, 4, 4) and expected.dtype == np.int32
  for i in range(4):
    np.testing.assert_array_equal(source[i]["codes"], expected[i])
  np.testing.assert_array_equal(codec.encode(images)[..., 0], expected)
  assert codec.decode(codec.encode(images)).shape == (4, 16, 16, 3)


def test_chameleon_trains_on_the_lm_loss_alone_and_generates(code_cache, vq_run, data_dir, tmp_path):  # noqa: F811
  config = chameleon_config(data_dir, vq_run, code_cache, total_steps=12, eval_every=12, eval_examples=4)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  history = [m for m in read_metrics(workdir) if "loss" in m]
  losses = [m["loss"] for m in history]
  assert all(m["images"] == 0 and m["image_loss"] == 0 and m["z_loss"] > 0 for m in history)
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  with open(os.path.join(workdir, "eval", "step_12.json")) as f:
    report = json.load(f)
  assert set(report["image_loss"]) == {"code_nll", "codes"} and report["image_loss"]["codes"] == 4 * 16
  assert 0 < report["image_loss"]["code_nll"] < 2 * np.log(16 + 512)
  assert "shapes_all" in report["text_to_image"] and "cider" in report["image_to_text"]
  assert os.path.isfile(os.path.join(workdir, "samples", "step_12", "images.png"))

  sampler = sampler_lib.load(workdir)
  assert isinstance(sampler.codec, codecs.VqCodec) and sampler.model.cfg.vocab_size == 512 + 16
  options = decoding.SamplingOptions(cfg_scale=2.0, image_top_k=3, max_new_tokens=5)
  codes = sampler.latents(["a red circle", "two blue squares"], options, jax.random.key(0))
  assert codes.shape == (2, 4, 4, 1) and np.all(codes == np.rint(codes)) and codes.min() >= 0 and codes.max() < 16
  again = sampler.latents(["a red circle", "two blue squares"], options, jax.random.key(0))
  np.testing.assert_array_equal(codes, again)
  images = sampler.codec.decode(codes)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  captions = sampler.caption(images, options, jax.random.key(1))
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

  summary = generate.run(cli_args(workdir, str(tmp_path / "generated"), prompt=["a red circle"], image_top_k=3))
  assert os.path.isfile(tmp_path / "generated" / summary["outputs"][0]["image"])
  summary = generate.run(cli_args(workdir, str(tmp_path / "captioned"), mode="caption", test_examples=2))
  assert len(summary["outputs"]) == 2 and all(isinstance(o["caption"], str) for o in summary["outputs"])

  out = export.export(workdir, str(tmp_path / "export"))
  shutil.rmtree(vq_run + "_moved", ignore_errors=True)
  os.rename(vq_run, vq_run + "_moved")          # the export needs neither the run nor its VQ-VAE
  try:
    exported = sampler_lib.load_export(out)
    np.testing.assert_array_equal(exported.latents(["a red circle", "two blue squares"], options, jax.random.key(0)),
                                  codes)
    np.testing.assert_array_equal(exported.codec.decode(codes), images)
  finally:
    os.rename(vq_run + "_moved", vq_run)


def test_prepare_with_a_vq_vae_stores_codes_and_a_chameleon_run_trains_on_them(vq_run, prepared_mixture,
                                                                               tmp_path):  # noqa: F811
  pixels = prepared.read_manifest(str(prepared_mixture / "images"))
  manifest = prepare.prepare(prepare_config(path=str(prepared_mixture / "folder"), vae=vq_run), tmp_path / "codes")
  assert manifest["latents"] and manifest["splits"] == {
      k: dict(v, shards=manifest["splits"][k]["shards"], bytes=manifest["splits"][k]["bytes"])
      for k, v in pixels["splits"].items()}
  images = prepared.PreparedSource(prepared_mixture / "images", "train")
  coded = prepared.PreparedSource(tmp_path / "codes", "train")
  expected = codecs.vq_codec(vq_run).codes(np.stack([images[i]["image"] for i in range(len(images))]))
  np.testing.assert_array_equal(np.stack([coded[i]["codes"] for i in range(len(coded))]), expected)
  metadata = codecs.read_codec_metadata(str(tmp_path / "codes"))
  assert metadata["codec"] == "vq" and metadata["codes_used"] == len(np.unique(expected))

  config = tiny_run_config(str(tmp_path / "unused_tfds"), total_steps=3, seq_len=128, ckpt_every=3, sample_every=3)
  config.data.codec, config.data.vae, config.data.codebook_size, config.data.latent_downsample = "vq", vq_run, 16, 4
  config.model.patch_size, config.data.sample_split = 1, "train"
  for name, path in (("text", prepared_mixture / "text"), ("codes", tmp_path / "codes")):
    config.data.mixture[name] = ml_collections.ConfigDict(dict(path=str(path), weight=0.5, split="train"))
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  history = [m for m in read_metrics(workdir) if "loss" in m]
  assert [m["step"] for m in history] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in history)
  assert os.path.isfile(os.path.join(workdir, "samples", "step_3", "images.png"))
  config.data.codec = "vae"
  with pytest.raises(ValueError, match="is a VQ-VAE: set config.data.codec = 'vq'"):
    trainer.train_and_evaluate(config, str(tmp_path / "wrong"))
