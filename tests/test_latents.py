"""The latent pipeline end to end on tiny settings: train_vae (with LPIPS and the GAN switched on), the
vae codec from a workdir and from a diffusers directory, the latent cache, and Transfusion trained on
cached latents, sampled and reloaded."""
import os
import shutil

import flax
import jax
import numpy as np
from PIL import Image
import pytest

from tfusion import codecs, config as config_lib, encode_latents, sharding, train_vae
from tfusion.data import latent_cache, shapes
from tfusion.metrics import read_metrics
from tfusion.models import discriminator, lpips, vae as vae_lib
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.training import trainer, vae_step
from tests.helpers import tiny_run_config

SIZE = 16


def tiny_vae_config(data_dir, lpips_file, moco_file):  # noqa: F811
  c = config_lib.default_vae_config()
  c.total_steps, c.batch_size, c.log_every, c.ckpt_every, c.sample_every = 8, 8, 1, 4, 4
  c.model.block_out_channels, c.model.layers_per_block, c.model.latent_channels = (8, 16, 16), 1, 4
  c.model.norm_num_groups = 4
  c.discriminator.channels, c.discriminator.num_layers = 8, 2
  c.loss.gan_start_step, c.loss.lpips_params, c.loss.moco_params = 4, lpips_file, moco_file
  c.optim.warmup_steps, c.optim.lr = 2, 1e-3
  c.data.data_dir, c.data.image_size = data_dir, SIZE
  return c


def random_weights_file(network, save, path: str) -> str:
  """Random positive weights for a frozen distance network (numpy draws: no init program to compile)."""
  rng = np.random.default_rng(0)
  shapes_ = jax.eval_shape(network.init, jax.random.key(0), *[jax.ShapeDtypeStruct((1, SIZE, SIZE, 3),
                                                                                   np.float32)] * 2)
  params = jax.tree.map(lambda s: np.abs(rng.normal(0, 0.05, s.shape)).astype(np.float32) + 0.01,
                        flax.linen.meta.unbox(shapes_["params"]))
  save(path, params)
  return path


@pytest.fixture(scope="module")
def vae_run_and_config(tmp_path_factory, data_dir):  # noqa: F811
  root = tmp_path_factory.mktemp("vae")
  # LPIPS stands for both frozen networks (MoCo goes through the same `frozen` dict; tests/test_moco.py checks
  # its numerics): a ResNet-50 backward pass would add a minute of compilation to the suite.
  config = tiny_vae_config(data_dir, random_weights_file(lpips.LPIPS(), lpips.save_lpips_params,
                                                         str(root / "lpips.safetensors")), "")
  workdir = str(root / "run")
  train_vae.train_vae(config, workdir)
  return workdir, config


@pytest.fixture(scope="module")
def vae_run(vae_run_and_config):
  return vae_run_and_config[0]


def latent_config(data_dir, vae, cache, **top):  # noqa: F811
  c = tiny_run_config(data_dir, **top)
  c.data.codec, c.data.vae, c.data.latent_cache = "vae", vae, cache
  c.data.latent_channels, c.data.latent_downsample = 4, 4
  c.model.patch_size = 2
  return c


@pytest.fixture(scope="module")
def cache(vae_run, tmp_path_factory, data_dir):  # noqa: F811
  directory = str(tmp_path_factory.mktemp("latents"))
  encode_latents.encode_dataset(latent_config(data_dir, vae_run, directory))
  return directory


def test_vae_run_leaves_checkpoints_metrics_and_reconstructions(vae_run):
  assert sorted(os.listdir(os.path.join(vae_run, "checkpoints"))) == ["4", "8"]
  metrics = read_metrics(vae_run)
  assert [m["step"] for m in metrics] == list(range(1, 9))
  assert {"l1", "kl", "lpips", "psnr", "loss"} <= set(metrics[0]) and "gan" not in metrics[3]
  assert metrics[0]["lpips"] > 0 and "moco" not in metrics[0]           # no MoCo weights file: the term is off
  assert {"gan", "disc_loss"} <= set(metrics[4])           # the GAN is on after gan_start_step = 4
  assert [m["step"] for m in metrics if "test_psnr" in m] == [4, 8]
  assert all(np.isfinite(m["loss"]) for m in metrics) and 5 < metrics[-1]["test_psnr"] < 60
  grid = Image.open(os.path.join(vae_run, "samples", "step_8", "reconstructions.png"))
  assert grid.size == (4 * 128, 4 * (128 + 40))


def test_vae_resume_continues_from_the_last_checkpoint(vae_run_and_config, tmp_path):
  finished, config = vae_run_and_config
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  config = config.copy_and_resolve_references()
  config.total_steps = 10
  train_vae.train_vae(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["4", "8", "10"]
  assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 11))


def test_cache_holds_the_codec_and_equals_encoding_on_the_fly(cache, vae_run, data_dir):  # noqa: F811
  metadata = codecs.read_codec_metadata(cache)
  assert metadata["vae"] == os.path.abspath(vae_run) and metadata["vae_step"] == 8
  assert metadata["splits"] == {"train": 20_000, "test": 1000} and metadata["images_measured"] == 20_000
  codec = codecs.codec_from_metadata(metadata)
  test_images = shapes.load_shapes(data_dir, "test", SIZE)
  cached = latent_cache.LatentSource(cache, "test").__getitems__(range(40))
  examples = test_images.__getitems__(list(range(40)))
  assert [c["caption"] for c in cached] == [e["caption"] for e in examples]
  on_the_fly = codec.encode(np.stack([e["image"] for e in examples]))
  assert on_the_fly.shape == (40, 4, 4, 4)
  np.testing.assert_allclose(np.stack([codec.normalize(c["latents"]) for c in cached]), on_the_fly, atol=1e-5)
  # shift and scale make the train latents zero-mean, unit-variance per channel
  train_latents = np.stack([c["latents"] for c in latent_cache.LatentSource(cache, "train").__getitems__(
      range(20_000))])
  normalized = codec.normalize(train_latents).reshape(-1, 4)
  np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(normalized.std(0), 1, atol=1e-4)
  # value_range is the largest |normalised train latent|: what the sampler clips its x0 estimates to.
  assert metadata["value_range"] == pytest.approx(np.abs(normalized).max(), rel=1e-4)
  assert codec.value_range == metadata["value_range"]


def test_encoding_again_keeps_the_cache(cache, vae_run, data_dir):  # noqa: F811
  path = latent_cache.split_path(cache, "train")
  before = os.stat(path).st_mtime_ns
  encode_latents.encode_dataset(latent_config(data_dir, vae_run, cache))
  assert os.stat(path).st_mtime_ns == before


def test_diffusers_export_of_the_vae_encodes_the_same(vae_run, tmp_path):
  codec = codecs.vae_codec(vae_run)
  directory = str(tmp_path / "diffusers")
  vae_lib.save_diffusers(directory, codec.vae, jax.device_get(codec.params))
  imported = codecs.vae_codec(directory)
  assert imported.metadata["vae_format"] == "diffusers" and imported.vae == codec.vae
  images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  np.testing.assert_array_equal(imported.encode(images), codec.encode(images))
  assert codec.decode(codec.encode(images)).shape == (3, SIZE, SIZE, 3)


def test_transfusion_trains_and_samples_on_cached_latents(cache, vae_run, data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(latent_config(data_dir, vae_run, cache), workdir)
  assert codecs.read_codec_metadata(workdir) == codecs.read_codec_metadata(cache)
  metrics = read_metrics(workdir)
  assert all(np.isfinite(m["image_loss"]) for m in metrics) and metrics[-1]["images"] > 0
  grid = Image.open(os.path.join(workdir, "samples", "step_6", "images.png"))
  assert grid.size == (4 * 128, 128 + 40)
  sampler = sampler_lib.load(workdir)
  assert isinstance(sampler.codec, codecs.VaeCodec)
  images = sampler.text_to_image(["a red circle"], decoding.SamplingOptions(diffusion_steps=3), jax.random.key(0))
  assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_bad_latent_settings_name_the_field(cache, vae_run, data_dir, tmp_path):  # noqa: F811
  config = latent_config(data_dir, vae_run, cache)
  config.data.latent_channels = 8
  with pytest.raises(ValueError, match=r"config.data.latent_channels = 8, but the VAE .* has 4 latent channels"):
    trainer.train_and_evaluate(config, str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="python -m tfusion.encode_latents"):
    trainer.train_and_evaluate(latent_config(data_dir, vae_run, str(tmp_path / "none")), str(tmp_path / "b"))
  with pytest.raises(FileNotFoundError, match="config.data.vae = .*neither a tfusion.train_vae workdir"):
    encode_latents.encode_dataset(latent_config(data_dir, str(tmp_path / "no_vae"), str(tmp_path / "c")))
  config = latent_config(data_dir, vae_run, cache)
  config.data.latent_cache = ""
  with pytest.raises(config_lib.ConfigError, match="config.data.latent_cache is empty"):
    encode_latents.encode_dataset(config)


def test_vae_step_on_an_fsdp_mesh_equals_one_device():
  """The VAE and discriminator params shard by their logical names (fsdp over 4 devices), and two
  adversarial steps give what one device gives."""
  config = tiny_vae_config("unused", "", "")
  vae = codecs.vae_config_of_run(config)
  model, disc = vae_lib.AutoencoderKL(vae), discriminator.PatchDiscriminator(8, 2)
  tx = vae_step.make_optimizer(config.optim)
  images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
  results = []
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 4)):
    mesh_config = config.mesh.copy_and_resolve_references()
    mesh_config.ici_fsdp_parallelism = fsdp
    mesh = sharding.make_mesh(mesh_config, devices)
    state, shardings = sharding.create_sharded(vae_step.init_fn(model, disc, tx, SIZE), jax.random.key(0), mesh)
    step = vae_step.jit_train_step(mesh, shardings, adversarial=True, vae=model, disc=disc, tx=tx,
                                   weights=vae_step.LossWeights.of(config.loss), train_key=jax.random.key(1))
    batch = jax.device_put(images, sharding.batch_sharding(mesh))
    losses = []
    for _ in range(2):
      with jax.set_mesh(mesh):
        state, metrics = step(state, batch, {})
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state)))
  kernel = state.params["decoder"]["conv_in"]["kernel"]
  assert kernel.sharding.spec[-1] == "fsdp" and len(kernel.sharding.device_set) == 8
  (losses_1, state_1), (losses_8, state_8) = results
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise moves a param by up to ~lr/20 (lr is
  # 5e-4 at step 1); a wrong sharding moves every param by ~lr and changes the second loss.
  for tree_1, tree_8 in ((state_1.params, state_8.params), (state_1.disc_params, state_8.disc_params)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), tree_1, tree_8)
