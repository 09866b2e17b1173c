"""The U-Net runs on the images rows hold, not on empty slots: map_present, and the model that uses it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import sharding
from tfusion.data import sequence
from tfusion.models import present_images
from tests.helpers import LAYOUT, init_state, make_model, run_steps
from tests.test_model import tiny_batch, tiny_model_config

PATTERNS = {"mixed": [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], "none": [[0] * 4] * 3, "all": [[1] * 4] * 3}


def per_slot(x, t):
  """A per-image function with two outputs: x [N, 5], t [N] -> {"y": [N, 5], "s": [N]}."""
  return {"y": jnp.tanh(2.0 * x + t[:, None]), "s": (x * x).sum(-1)}


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
          jnp.asarray(rng.standard_normal((3, 4)), jnp.float32))


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_values_and_gradients_on_present_slots_zero_elsewhere(pattern, chunk):
  present = jnp.array(PATTERNS[pattern], bool)
  x, t = inputs()
  out = jax.jit(lambda x, t: present_images.map_present(per_slot, present, x, t, chunk=chunk))(x, t)
  every = per_slot(x.reshape(12, 5), t.reshape(12))
  np.testing.assert_allclose(out["y"], np.where(present[..., None], every["y"].reshape(3, 4, 5), 0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out["s"], np.where(present, every["s"].reshape(3, 4), 0), rtol=1e-6)

  def loss(fn):
    return lambda x, t: (fn(x, t)["y"] * jnp.arange(5.0)).sum() + fn(x, t)["s"].sum()
  dense = lambda x, t: jax.tree.map(  # noqa: E731
      lambda y: y * present.reshape(present.shape + (1,) * (y.ndim - 2)),
      jax.tree.map(lambda y: y.reshape(3, 4, *y.shape[1:]), per_slot(x.reshape(12, 5), t.reshape(12))))
  got = jax.grad(loss(lambda x, t: present_images.map_present(per_slot, present, x, t, chunk=chunk)), (0, 1))(x, t)
  want = jax.grad(loss(dense), (0, 1))(x, t)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunks_without_present_slots_are_not_computed():
  calls = []

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return per_slot(x, t)

  x, t = inputs()
  for pattern, chunk, runs in (("mixed", 2, 3), ("mixed", 4, 2), ("none", 2, 0), ("all", 4, 3), ("mixed", 1, 6)):
    calls.clear()
    run = jax.jit(lambda x, t: present_images.map_present(counted, jnp.array(PATTERNS[pattern], bool), x, t,
                                                          chunk=chunk))
    jax.block_until_ready(run(x, t))
    jax.effects_barrier()
    assert len(calls) == runs, (pattern, chunk)


def test_slots_are_reordered_within_batch_shards_and_sharded_equals_unsharded():
  """Under a mesh the slots move only inside their shard: 8 rows on data 2 x fsdp 2 are 4 shards of 2 rows."""
  present = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]] * 4, bool)
  rng = np.random.default_rng(1)
  x, t = jnp.asarray(rng.standard_normal((8, 4, 5)), jnp.float32), jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  run = lambda x, t: present_images.map_present(per_slot, present, x, t, chunk=4)  # noqa: E731
  single = jax.jit(run)(x, t)
  mesh_config = tiny_model_config().mesh
  mesh_config.ici_data_parallelism, mesh_config.ici_fsdp_parallelism, mesh_config.ici_tensor_parallelism = 2, 2, 2
  mesh = sharding.make_mesh(mesh_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    assert present_images.batch_shards(8) == 4 and present_images.batch_shards(6) == 1
    sharded = jax.jit(run)(jax.device_put(x, sharding.batch_sharding(mesh)), t)
  for k in single:
    np.testing.assert_allclose(sharded[k], single[k], atol=1e-6)


def test_present_slots_count_each_rows_images():
  batch = tiny_batch()                          # row 0 holds one image, row 1 two
  present = present_images.present_slots(jnp.asarray(batch["image_ids"]), LAYOUT.max_images, 16)
  assert present.shape == (2, LAYOUT.max_images)
  np.testing.assert_array_equal(present.sum(1), [1, 2])
  np.testing.assert_array_equal(present[:, :2], [[True, False], [True, True]])


def test_unet_model_equals_running_every_slot():
  """Outputs on the images and the train step's loss and gradients equal the U-Net's run on every slot
  (model.unet_skip_empty_slots off); the empty slots predict 0."""
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  single = sharding.make_mesh(tiny_model_config().mesh, jax.devices()[:1])
  outputs, histories = [], []
  for skip in (True, False):
    config = tiny_model_config(patch_encoder="unet", unet_channels=(8, 16), unet_res_blocks=1,
                               unet_skip_empty_slots=skip)
    model = make_model(config)
    params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
    params["patch_decoder"]["conv_out"]["kernel"] = jax.random.normal(jax.random.key(3), (3, 3, 8, 3))
    outputs.append(jax.jit(lambda p, *x: model.apply({"params": p}, *x))(params, *inputs))
    _, state, step = init_state(config, single)
    histories.append(run_steps(single, state, step, batch, 2)[1])
  (logits, eps), (logits_all, eps_all) = outputs
  history, history_all = histories

  # The U-Net's convolutions on 3 slots and on 4 may sum in another order: f32 rounding, relative.
  np.testing.assert_allclose(logits, logits_all, rtol=1e-5, atol=1e-5)
  present = np.array([[True, False], [True, True]])
  np.testing.assert_allclose(eps[:, :2][present], eps_all[:, :2][present], rtol=1e-5, atol=1e-5)
  assert np.abs(eps_all[0, 1]).max() > 0 and np.all(eps[0, 1:] == 0) and np.all(eps[1, 2:] == 0)
  for a, b in zip(history, history_all):
    for key in ("loss", "image_loss", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5)


def test_unet_skipping_empty_slots_sharded_equals_one_device():
  """4 rows on data 2 x fsdp 2: each device orders and skips its own slots; a step equals one device's."""
  batch4 = {k: np.concatenate([v] * 2) for k, v in tiny_batch().items()}
  config = tiny_model_config(patch_encoder="unet", unet_channels=(8, 16), unet_res_blocks=1,
                             unet_skip_empty_slots=True)
  single = sharding.make_mesh(config.mesh, jax.devices()[:1])
  _, state, step = init_state(config, single)
  _, h1 = run_steps(single, state, step, batch4, 1)
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism = 2, 2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  _, state, step = init_state(config, mesh)
  _, h4 = run_steps(mesh, state, step, batch4, 1)
  for a, b in zip(h1, h4):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=2e-5)
