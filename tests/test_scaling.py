"""Scale-out features on 8 fake CPU devices: meshes, sharding rules, gradient accumulation, remat,
attention implementations, mixed precision and FLOP counting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tfusion import config as config_lib, diffusion, flops, sharding
from tfusion.models import transformer
from tfusion.data import sequence
from tfusion.training import step as step_lib
from tests.helpers import LAYOUT, init_state, make_model, run_steps, tiny_batch, tiny_model_config

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def mesh_of(config, shape):
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism, config.mesh.ici_tensor_parallelism = shape
  return sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(shape))])


def batch_of_8_rows():
  return {k: np.concatenate([v] * 4) for k, v in tiny_batch().items()}


@pytest.fixture(scope="module")
def single_device_run():
  config = tiny_model_config()
  mesh = mesh_of(config, (1, 1, 1))
  _, state, step = init_state(config, mesh)
  state, history = run_steps(mesh, state, step, batch_of_8_rows(), 2)
  return jax.device_get(state.params), history


@pytest.mark.parametrize("shape", MESHES)
def test_two_steps_on_any_mesh_equal_one_device(shape, single_device_run):
  params1, history1 = single_device_run
  config = tiny_model_config()
  mesh = mesh_of(config, shape)
  _, state, step = init_state(config, mesh)
  state, history = run_steps(mesh, state, step, batch_of_8_rows(), 2)
  for a, b in zip(history1, history):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5), params1, jax.device_get(state.params))


def test_parameter_shardings_follow_the_rules():
  config = tiny_model_config()
  mesh = mesh_of(config, (1, 2, 4))
  _, state, _ = init_state(config, mesh)
  p = state.params
  spec = lambda x: x.sharding.spec  # noqa: E731
  layer = p["transformer"]["layers"]
  # Megatron layout: q/k/v split by heads, the output projection by its input heads, MLP by hidden
  # units; every matrix also split over fsdp along d_model; the leading axis is the layer stack.
  assert spec(layer["attention"]["query"]["kernel"]) == P(None, "fsdp", "tensor", None)
  assert spec(layer["attention"]["out"]["kernel"]) == P(None, "tensor", None, "fsdp")
  assert spec(layer["mlp"]["gate"]["kernel"]) == P(None, "fsdp", "tensor")
  assert spec(layer["mlp"]["down"]["kernel"]) == P(None, "tensor", "fsdp")
  assert spec(layer["attention_norm"]["scale"]) == P(None, None)
  assert spec(p["token_embedding"]["embedding"]) == P("tensor", "fsdp")
  assert spec(p["lm_head"]["kernel"]) == P("fsdp", "tensor")
  assert spec(p["patch_decoder"]["proj"]["kernel"]) == P("fsdp", None)
  query = layer["attention"]["query"]["kernel"]
  assert query.addressable_shards[0].data.shape == (2, 16, 1, 8)    # [layers, 32 / 2, 4 / 4, 8]
  # Adam moments are laid out like the parameters.
  mu = state.opt_state[1][0].mu
  assert mu["transformer"]["layers"]["mlp"]["down"]["kernel"].sharding == layer["mlp"]["down"]["kernel"].sharding


def test_uneven_dimensions_stay_whole():
  config = tiny_model_config()
  mesh = mesh_of(config, (1, 8, 1))
  boxed = {"uneven": nn.Partitioned(jax.ShapeDtypeStruct((3, 16), jnp.float32), names=("embed", "mlp")),
           "even": nn.Partitioned(jax.ShapeDtypeStruct((16, 3), jnp.float32), names=("embed", "mlp"))}
  named = sharding.logical_shardings(mesh, boxed)
  assert named["uneven"].spec == P(None, "tensor")      # 3 rows cannot split over 8 fsdp devices
  assert named["even"].spec == P("fsdp", "tensor")      # (tensor has size 1 here)


def loss_and_grads(config, batch, microbatches):
  model = make_model(config)
  params = model.init(jax.random.key(0), *sequence.model_inputs(sequence.dummy_batch(1, LAYOUT)))
  params = nn.meta.unbox(params)["params"]
  params["patch_decoder"]["proj"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), (32, 12))
  fn = jax.jit(lambda p, b: step_lib.loss_and_grads(
      p, b, jax.random.key(7), model=model, alpha_bar=jnp.asarray(diffusion.cosine_alpha_bar(1000), jnp.float32),
      loss_weight=5.0, microbatches=microbatches))
  return jax.device_get(fn(params, batch))


def gradient_program(config) -> str:
  """The jaxpr of the model's gradient, to check which implementation a switch selects."""
  model = make_model(config)
  inputs = sequence.model_inputs(tiny_batch())
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *inputs))["params"])
  return str(jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, *inputs)[0].sum()))(params))


def test_gradient_accumulation_over_4_microbatches_equals_one_batch():
  batch = batch_of_8_rows()
  # Make the microbatches differ in their text-target and image counts.
  batch["text_loss_mask"][1::4] = False
  batch["image_valid"][2::4, 1:] = False
  metrics1, grads1 = loss_and_grads(tiny_model_config(), batch, 1)
  metrics4, grads4 = loss_and_grads(tiny_model_config(), batch, 4)
  for k in ("loss", "text_loss", "image_loss", "text_targets", "images"):
    np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7), grads1, grads4)
  assert metrics1["text_targets"] < batch["text_loss_mask"].size


def test_gradient_accumulation_in_the_sharded_step():
  config = tiny_model_config()
  mesh = mesh_of(config, (2, 2, 2))
  first_steps = []
  for microbatches in (1, 2):
    _, state, step = init_state(config, mesh, microbatches=microbatches)
    first_steps.append(run_steps(mesh, state, step, batch_of_8_rows(), 1)[1][0])
  np.testing.assert_allclose(first_steps[1]["loss"], first_steps[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(first_steps[1]["grad_norm"], first_steps[0]["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_identical_gradients(policy):
  batch = tiny_batch()
  _, grads = loss_and_grads(tiny_model_config(), batch, 1)
  _, grads_remat = loss_and_grads(tiny_model_config(remat_policy=policy), batch, 1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8), grads, grads_remat)
  assert "remat" in gradient_program(tiny_model_config(remat_policy=policy))     # the switch reaches the layers
  assert "remat" not in gradient_program(tiny_model_config())


@pytest.mark.parametrize("attention", ["chunked", "dot_product"])
def test_attention_implementations_agree_with_dense(attention):
  batch = tiny_batch()
  metrics, grads = loss_and_grads(tiny_model_config(), batch, 1)
  metrics2, grads2 = loss_and_grads(tiny_model_config(attention=attention, attention_chunk=16), batch, 1)
  np.testing.assert_allclose(metrics2["loss"], metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), grads, grads2)
  dense, other = gradient_program(tiny_model_config()), gradient_program(tiny_model_config(attention=attention, attention_chunk=16))
  assert other != dense                                                      # not a silent fall-back to dense
  if attention == "chunked":
    assert other.count("cond[") > dense.count("cond[")                       # a branch per block pair


@pytest.mark.parametrize("chunk", [16, 24, 100])
def test_chunked_attention_equals_dense_for_any_chunk_length(chunk):
  batch = tiny_batch()                                  # 64 positions: 24 and 100 do not divide them
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 4, 8)) for i in range(3))
  ids = (jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["image_ids"]), jnp.arange(64))
  np.testing.assert_allclose(transformer.chunked_attention(q, ids, [(k, v, ids)], chunk),
                             transformer.dense_attention(q, k, v, ids, ids), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_model_config(dtype=dtype)
    mesh = mesh_of(config, (2, 2, 2))
    _, state, step = init_state(config, mesh)
    state, history = run_steps(mesh, state, step, batch_of_8_rows(), 1)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[dtype] = history[0]["loss"]
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  assert losses["bfloat16"] != losses["float32"]


def test_flop_count_matches_the_analytic_formula():
  config = tiny_model_config()
  model = make_model(config)
  batch = jax.eval_shape(lambda: sequence.dummy_batch(2, LAYOUT))
  params = jax.eval_shape(lambda *x: nn.meta.unbox(model.init(jax.random.key(0), *x)), *sequence.model_inputs(batch))
  counted = flops.forward_flops(model, params["params"], sequence.model_inputs(batch))
  rows, length, d, mlp, layers, vocab = 2, LAYOUT.seq_len, 32, 64, 2, 64
  matmuls = layers * (2 * 4 * d * d + 2 * 3 * d * mlp + 2 * 2 * length * d) + 2 * d * vocab
  patches = 2 * 2 * 12 * d * LAYOUT.max_images * 16 / length      # encoder + decoder, per position
  analytic = rows * length * (matmuls + patches)
  assert 1.0 <= counted / analytic < 1.15       # the rest: softmax, norms, RoPE, timestep MLP
  assert flops.train_flops(model, params["params"], sequence.model_inputs(batch)) == 3 * counted


def test_bad_mesh_sizes_name_the_fields():
  config = config_lib.default_config()
  config.mesh.ici_fsdp_parallelism = 3
  with pytest.raises(ValueError, match=r"config.mesh.ici_\* sizes \[-1, 3, 1\] do not divide the 8 devices"):
    sharding.make_mesh(config.mesh)
  config.mesh.ici_fsdp_parallelism, config.mesh.dcn_data_parallelism = 1, 2
  with pytest.raises(ValueError, match=r"config.mesh.dcn_\* sizes \[2, 1, 1\] do not divide the 1 slices"):
    sharding.make_mesh(config.mesh)
