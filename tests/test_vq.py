"""VQ-VAE (model.bottleneck = "vq"): the quantiser (nearest code, straight-through gradient, codebook and
commitment loss, usage and perplexity, dead-code restart) on hand examples, the VQModel API, the train step,
train_vae end to end with a resume, and the config checks."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from tfusion import codecs, config as config_lib, sharding, train_vae
from tfusion.metrics import read_metrics
from tfusion.models import discriminator, quantizer, vae
from tfusion.training import vae_step
from tests.helpers import logically_partitioned_params

CODEBOOK = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
TINY = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
SIZE = 16


def quantise(z, codebook=CODEBOOK):
  """(z_q, codes) of the VectorQuantizer with `codebook`."""
  return quantizer.VectorQuantizer(*codebook.shape).apply({"params": {"embedding": codebook}}, z)


def test_nearest_code_on_a_hand_example():
  z = jnp.array([[0.9, 0.1], [0.1, 1.2], [-5.0, 0.0], [0.0, 0.9], [0.5, 0.0]])
  # squared distances to (0, 0), (1, 0), (0, 2): [.82 .02 3.62], [1.45 2.25 .65], [25 36 29], [.81 1.81 1.21],
  # [.25 .25 4.25] (a tie: the lower index)
  z_q, codes = quantise(z)
  assert codes.dtype == jnp.int32 and codes.tolist() == [1, 2, 0, 0, 0]
  np.testing.assert_array_equal(z_q, CODEBOOK[np.array([1, 2, 0, 0, 0])])
  z_q, codes = quantise(CODEBOOK)                                   # a code quantises to itself
  assert codes.tolist() == [0, 1, 2]
  np.testing.assert_array_equal(z_q, CODEBOOK)


def test_nearest_code_equals_brute_force_and_codes_quantise_to_themselves():
  rng = np.random.default_rng(0)
  codebook = rng.standard_normal((256, 8)).astype(np.float32)
  z = rng.standard_normal((3, 5, 8)).astype(np.float32)
  brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  assert np.asarray(quantizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))).tolist() == brute.tolist()
  z_q, codes = quantise(jnp.asarray(codebook), jnp.asarray(codebook))
  assert codes.tolist() == list(range(256))
  np.testing.assert_array_equal(z_q, codebook)


def test_straight_through_gradient_is_the_identity_to_z_e_and_none_to_the_codebook():
  z_e = jnp.array([[0.9, 0.1], [0.1, 1.2]])

  def decoder_input(z, codebook=CODEBOOK):
    return quantizer.straight_through(z, quantise(z, codebook)[0])

  np.testing.assert_allclose(decoder_input(z_e), [[1.0, 0.0], [0.0, 2.0]], atol=1e-7)    # the codes' value
  np.testing.assert_array_equal(jax.jacobian(decoder_input)(z_e).reshape(4, 4), np.eye(4))
  codebook_grad = jax.grad(lambda c: jnp.sum(decoder_input(z_e, c) ** 2))(CODEBOOK)
  np.testing.assert_array_equal(codebook_grad, np.zeros((3, 2)))


def test_codebook_and_commitment_losses_on_a_hand_example():
  z_e, z_q = jnp.array([[1.0, 2.0], [0.0, 1.0]]), jnp.array([[0.0, 0.0], [0.0, 2.0]])
  codebook, commitment = quantizer.vq_losses(z_e, z_q, 0.25)
  assert float(codebook) == 1.5 and float(commitment) == 0.375     # mean of (1, 4, 0, 1); 0.25 of it
  # the codebook term moves only the codes, towards z_e: d/dz_q = -2 (z_e - z_q) / 4
  d_e, d_q = jax.grad(lambda e, q: quantizer.vq_losses(e, q, 0.25)[0], argnums=(0, 1))(z_e, z_q)
  np.testing.assert_array_equal(d_e, np.zeros((2, 2)))
  np.testing.assert_array_equal(d_q, [[-0.5, -1.0], [0.0, 0.5]])
  # the commitment term moves only the encoder output, towards its code: d/dz_e = 0.25 * 2 (z_e - z_q) / 4
  d_e, d_q = jax.grad(lambda e, q: quantizer.vq_losses(e, q, 0.25)[1], argnums=(0, 1))(z_e, z_q)
  np.testing.assert_array_equal(d_e, [[0.125, 0.25], [0.0, -0.125]])
  np.testing.assert_array_equal(d_q, np.zeros((2, 2)))


def test_usage_and_perplexity():
  counts = quantizer.code_counts(jnp.array([[0, 0], [1, 3]]), 4)
  assert counts.tolist() == [2, 1, 0, 1]
  usage, perplexity = quantizer.usage_and_perplexity(counts)
  assert float(usage) == 0.75
  np.testing.assert_allclose(perplexity, 2 ** 1.5, rtol=1e-6)      # entropy 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
  np.testing.assert_allclose(quantizer.usage_and_perplexity(jnp.array([5, 5, 5, 5]))[1], 4.0, rtol=1e-6)
  np.testing.assert_allclose(quantizer.usage_and_perplexity(jnp.array([0, 9, 0, 0]))[1], 1.0, rtol=1e-6)


def test_restart_replaces_codes_unused_for_the_window_by_encoder_outputs_of_the_batch():
  codebook = jnp.arange(8.0).reshape(4, 2)
  z_e = 100.0 + jnp.arange(10.0).reshape(5, 2)
  age, counts = jnp.array([0, 2, 1, 5]), jnp.array([3, 0, 0, 1])
  new, new_age, window_usage = quantizer.restart_unused(codebook, age, counts, z_e, jax.random.key(0), after=3)
  # ages after the batch: 0 (used), 3 (unused a third time: restarted), 2, 0 (old but used in this batch)
  assert new_age.tolist() == [0, 0, 2, 0] and float(window_usage) == 0.75
  np.testing.assert_array_equal(new[np.array([0, 2, 3])], codebook[np.array([0, 2, 3])])
  assert any(np.array_equal(new[1], row) for row in np.asarray(z_e))
  # every code unused for the window: each becomes an encoder output of the batch
  new, new_age, window_usage = quantizer.restart_unused(codebook, jnp.full(4, 2), jnp.zeros(4, jnp.int32), z_e,
                                                        jax.random.key(1), after=3)
  assert new_age.tolist() == [0] * 4 and float(window_usage) == 0.0
  assert all(any(np.array_equal(code, row) for row in np.asarray(z_e)) for code in np.asarray(new))


@pytest.fixture(scope="module")
def tiny_vq():
  model = vae.VQModel(TINY, 16, 3)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 12, 3)), jnp.float32)  # H != W
  return model, images, model.init(jax.random.key(0), images)


def test_vq_model_encodes_to_codes_and_decodes_codes(tiny_vq):
  model, images, variables = tiny_vq
  codes = model.apply(variables, images, method=model.encode)
  assert codes.dtype == jnp.int32 and codes.shape == (2, 4, 6)
  z_e = model.apply(variables, images, method=model.project)
  codebook = variables["params"]["quantize"]["embedding"].value
  assert codes.tolist() == np.argmin(((z_e[..., None, :] - codebook) ** 2).sum(-1), -1).tolist()
  vectors = model.apply(variables, codes, method=model.embed)
  assert vectors.shape == (2, 4, 6, 3)
  np.testing.assert_array_equal(vectors, codebook[codes])
  reconstruction, z_e_call, z_q, codes_call = model.apply(variables, images)
  assert reconstruction.shape == images.shape and codes_call.tolist() == codes.tolist()
  np.testing.assert_array_equal(z_e_call, z_e)
  np.testing.assert_array_equal(z_q, vectors)
  decoded = model.apply(variables, codes, method=model.decode)
  assert np.abs(decoded).max() > 0.1
  np.testing.assert_allclose(decoded, reconstruction, atol=1e-5)    # z_e + (z_q - z_e) rounds within an ulp of z_q
  with pytest.raises(ValueError, match="multiple"):
    model.apply(variables, images[:, :7], method=model.encode)


def test_vq_model_params_are_logically_named(tiny_vq):
  model, _, variables = tiny_vq
  logically_partitioned_params(variables)
  names = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"], sep="/")
  assert names["quantize/embedding"] == PartitionSpec("vq_codes", "vq_dim")
  shapes = traverse_util.flatten_dict(nn.unbox(variables)["params"], sep="/")
  assert shapes["encoder/conv_out/kernel"].shape == (3, 3, 16, 4)          # latent_channels, not 2 x
  assert shapes["quant_conv/kernel"].shape == (1, 1, 4, 3) and shapes["post_quant_conv/kernel"].shape == (1, 1, 3, 4)
  codebook = np.asarray(shapes["quantize/embedding"])
  assert codebook.shape == (16, 3) and np.abs(codebook).max() <= 1 / 16


def tiny_vq_config(data_dir="unused"):
  c = config_lib.default_vae_config()
  c.total_steps, c.batch_size, c.log_every, c.ckpt_every, c.sample_every = 4, 8, 1, 4, 4
  c.model.block_out_channels, c.model.layers_per_block, c.model.latent_channels = (8, 16, 16), 1, 4
  c.model.norm_num_groups, c.model.bottleneck, c.model.vq_dim, c.model.codebook_size = 4, "vq", 3, 16
  c.model.codebook_restart_steps = 2
  c.discriminator.channels, c.discriminator.num_layers = 8, 2
  c.optim.warmup_steps, c.optim.lr = 2, 1e-3
  c.data.data_dir, c.data.image_size = data_dir, SIZE
  return c


def test_train_step_restarts_unused_codes_and_the_loss_falls():
  """Steps on one batch of 8 images (one device): at step 2 the codes chosen in neither batch are the encoder
  outputs of the second batch; over 30 steps the loss falls and the codebook stays in use."""
  config = tiny_vq_config()
  model = codecs.autoencoder_of_run(config)
  disc, tx = discriminator.PatchDiscriminator(8, 2), vae_step.make_optimizer(config.optim)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = sharding.create_sharded(vae_step.init_fn(model, disc, tx, SIZE), jax.random.key(0), mesh)
  assert isinstance(state, vae_step.VQState) and state.code_age.tolist() == [0] * 16
  step = vae_step.jit_train_step(mesh, shardings, adversarial=False, vae=model, disc=disc, tx=tx,
                                 weights=vae_step.LossWeights.of(config.loss), train_key=jax.random.key(1),
                                 codebook_restart_steps=2)
  rng = np.random.default_rng(0)
  images = np.zeros((8, SIZE, SIZE, 3), np.uint8)
  for i in range(8):                                 # a coloured square on black, different per image
    top, left = rng.integers(0, 8, 2)
    images[i, top:top + 8, left:left + 8] = rng.integers(64, 256, 3)
  unit = images.astype(np.float32) / 127.5 - 1.0
  history, states = [], []
  for _ in range(30):
    with jax.set_mesh(mesh):
      state, metrics = step(state, images, {})
    history.append(jax.device_get(metrics))
    if len(states) < 2:
      states.append(jax.device_get(state))

  first, second = states
  age_after_first = first.code_age
  codes = model.apply({"params": first.params}, unit, method=model.encode)
  z_e = np.asarray(model.apply({"params": first.params}, unit, method=model.project)).reshape(-1, 3)
  restarted = (age_after_first == 1) & ~np.isin(np.arange(16), np.asarray(codes))
  assert restarted.sum() >= 1 and second.code_age[restarted].tolist() == [0] * restarted.sum()
  for code in second.params["quantize"]["embedding"][restarted]:
    assert np.abs(z_e - code).max(axis=1).min() < 1e-5              # an encoder output of the batch
  np.testing.assert_allclose(history[1]["codebook_usage_window"], 1 - restarted.sum() / 16)

  assert {"l1", "codebook", "commitment", "codebook_usage", "codebook_usage_window", "codebook_perplexity",
          "loss"} <= set(history[0]) and "kl" not in history[0]
  for m in history:
    np.testing.assert_allclose(m["commitment"], 0.25 * m["codebook"], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["l1"] + 1.25 * m["codebook"], rtol=1e-5)
  losses = np.array([m["loss"] for m in history])
  print("loss", losses[0], "->", losses[-5:].mean(), "usage", [round(float(m["codebook_usage"]), 3)
                                                               for m in history[::5]])
  assert np.all(np.isfinite(losses)) and losses[-5:].mean() < 0.6 * losses[0]
  assert min(m["codebook_usage"] for m in history[-5:]) >= 0.25 and history[-1]["codebook_perplexity"] > 3


def test_train_vae_vq_run_resumes_and_is_no_latent_codec(tmp_path, data_dir):  # noqa: F811
  config = tiny_vq_config(data_dir)
  workdir = str(tmp_path / "vq")
  train_vae.train_vae(config, workdir)
  config.total_steps = 6
  train_vae.train_vae(config, workdir)                   # resumes from step 4 with its code ages
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == list(range(1, 7)) and "kl" not in metrics[0]
  assert {"codebook", "commitment", "codebook_usage", "codebook_usage_window", "codebook_perplexity"} <= set(
      metrics[0])
  assert [m["step"] for m in metrics if "test_psnr" in m] == [4, 6] and 5 < metrics[-1]["test_psnr"] < 60
  assert all(0 < m["codebook_usage"] <= 1 and 1 <= m["codebook_perplexity"] <= 16 for m in metrics)
  assert os.path.isfile(os.path.join(workdir, "samples", "step_6", "reconstructions.png"))
  with pytest.raises(ValueError, match="is a VQ-VAE run .*not continuous latents"):
    codecs.load_vae(workdir)


@pytest.mark.parametrize("field, value, message", [
    ("model.bottleneck", "fsq", "config.model.bottleneck = 'fsq': must be one of ('kl', 'vq')"),
    ("model.codebook_size", 1, "config.model.codebook_size = 1: needs at least 2 codes"),
    ("model.codebook_size", 0, "config.model.codebook_size = 0: must be a positive integer"),
    ("model.vq_dim", 0, "config.model.vq_dim = 0: must be a positive integer"),
    ("model.codebook_restart_steps", 0, "config.model.codebook_restart_steps = 0: must be a positive integer"),
    ("loss.commitment_beta", -0.25, "config.loss.commitment_beta = -0.25: must be >= 0"),
    ("loss.codebook_weight", -1.0, "config.loss.codebook_weight = -1.0: must be >= 0"),
])
def test_bad_vq_values_name_the_field(field, value, message):
  config = tiny_vq_config()
  config_lib.validate_vae(config)
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate_vae(config)


def brute_force_codes(z, codebook):
  """numpy argmin of the squared distances (the first index on a tie): z [..., D], codebook [K, D] -> [...]."""
  return np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)


@pytest.mark.parametrize("chunk", [7, 16, 50, 4096])
def test_chunked_nearest_code_search_equals_brute_force(chunk):
  """50 codes in blocks of 7 (8 blocks, the last of 1 code), 16 (the last of 2), or one block."""
  rng = np.random.default_rng(1)
  codebook = rng.standard_normal((50, 4)).astype(np.float32)
  z = rng.standard_normal((6, 7, 4)).astype(np.float32)
  codes = jax.jit(quantizer.nearest_codes, static_argnums=2)(jnp.asarray(z), jnp.asarray(codebook), chunk)
  assert codes.dtype == jnp.int32 and codes.shape == (6, 7)
  assert np.asarray(codes).tolist() == brute_force_codes(z, codebook).tolist()
  assert len(set(np.asarray(codes).ravel().tolist())) > 15                    # many codes, from every block


def test_chunked_nearest_code_search_breaks_ties_to_the_lowest_index():
  """Codes and points on a half-integer grid (distances exact in float32): 40 codes from 9 distinct values, so each
  point is nearest to several copies, in different blocks of 3 codes; the first copy wins."""
  rng = np.random.default_rng(2)
  codebook = rng.integers(-1, 2, (40, 2)).astype(np.float32)
  z = (rng.integers(-3, 4, (64, 2)) / 2).astype(np.float32)
  brute = brute_force_codes(z, codebook)
  distances = ((z[:, None] - codebook) ** 2).sum(-1)
  tied = distances == distances.min(-1, keepdims=True)
  assert all(np.flatnonzero(row).max() // 3 > b // 3 for row, b in zip(tied, brute))   # a later block ties
  for chunk in (3, 16, 40):
    assert np.asarray(quantizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk)).tolist() == brute.tolist()


def test_chunked_nearest_code_search_passes_no_gradient():
  """codebook[nearest_codes(z, codebook)] is differentiable in the chosen rows of the codebook only; none to z."""
  rng = np.random.default_rng(3)
  codebook, z, w = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((10, 2), (5, 2), (5, 2)))

  def loss(z, codebook):
    return jnp.sum(jnp.take(codebook, quantizer.nearest_codes(z, codebook, 4), axis=0) * w)

  dz, dcodebook = jax.grad(loss, argnums=(0, 1))(z, codebook)
  expected = np.zeros((10, 2), np.float32)
  np.add.at(expected, brute_force_codes(np.asarray(z), np.asarray(codebook)), np.asarray(w))
  np.testing.assert_array_equal(dz, np.zeros((5, 2)))
  np.testing.assert_array_equal(dcodebook, expected)
