"""The Transfusion model and train step on tiny configs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import config as config_lib, diffusion, masks, objective, sharding, spec as spec_lib
from tfusion.data import sequence
from tfusion.models import patching, transformer, transfusion
from tfusion.training import optim, state as state_lib, step as step_lib
from tests.helpers import (LATENT, LAYOUT, SPECIAL, VOCAB, image_doc, init_state, make_model, packed_rows, run_steps,
                           tiny_batch, tiny_model_config)

def test_patchify_is_raster_order_and_inverts():
  x = jnp.arange(4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
  p = patching.patchify(x, 2)
  assert p.shape == (1, 4, 8)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:2, 2:4].reshape(-1))       # 2nd patch: top right
  np.testing.assert_array_equal(p[0, 2], x[0, 2:4, 0:2].reshape(-1))       # 3rd patch: bottom left
  # Every supported patch size on an 8x8 latent of c = 8, with the model's [B, M] leading axes.
  latent = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 8, 8)), jnp.float32)
  for k in (1, 2, 4, 8):
    p = patching.patchify(latent, k)
    assert p.shape == (2, 3, (8 // k) ** 2, k * k * 8)
    np.testing.assert_array_equal(p[..., 0, :], latent[..., :k, :k, :].reshape(2, 3, -1))     # top left
    np.testing.assert_array_equal(p[..., -1, :], latent[..., -k:, -k:, :].reshape(2, 3, -1))  # bottom right
    np.testing.assert_array_equal(patching.unpatchify(p, k, 8, 8), latent)
  np.testing.assert_array_equal(patching.patchify(latent, 1)[0, 0, 9], latent[0, 0, 1, 1])   # k = 1: pixels
  np.testing.assert_array_equal(patching.patchify(latent, 8)[0, 0, 0], latent[0, 0].reshape(-1))  # k = 8: all


def test_patch_slot_positions_are_the_patch_positions_in_order():
  """Slot k of a row holds the position of the row's k-th patch; slots past its patches hold 0."""
  image_ids = np.zeros((3, 20), np.int32)
  image_ids[0, 2:6], image_ids[0, 9:13] = 1, 2      # two images of 4 patches
  image_ids[1, 15:19] = 1                           # one image; row 2 has none
  got = np.asarray(transfusion.patch_slot_positions(jnp.asarray(image_ids), 10))
  want = np.zeros((3, 10), np.int32)
  want[0, :8] = [2, 3, 4, 5, 9, 10, 11, 12]
  want[1, :4] = [15, 16, 17, 18]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_elements_per_image_and_eps_shape_for_every_patch_size(k):
  """An 8x8x8 latent is (8/k)^2 sequence elements; linear and U-Net models return eps of the latent's shape."""
  n = (8 // k) ** 2
  for encoder in ("linear", "unet"):
    config = tiny_model_config(patch_size=k, patch_encoder=encoder, unet_channels=(8,) * k.bit_length(),
                               unet_res_blocks=1)
    config.data.codec, config.data.image_size, config.data.latent_downsample, config.data.latent_channels = (
        "vae", 64, 8, 8)
    config.seq_len = n + 7                                        # one row [BOS c c c BOI p*n EOI EOS]
    spec = spec_lib.resolve(config)
    model, layout = spec.transfusion(VOCAB), spec.layout
    assert layout.latent_shape == (8, 8, 8) and layout.patches_per_image == model.cfg.patches_per_image == n
    assert layout.max_images == (2 if k == 8 else 1)             # 8 elements hold two [BOI p EOI]

    batch = packed_rows(layout, [[image_doc(layout, caption=(10, 11, 12))]])
    assert (batch["image_ids"][0] == 1).sum() == n and np.flatnonzero(batch["image_ids"][0]).tolist() == list(
        range(5, 5 + n))
    assert batch["tokens"][0, 4] == SPECIAL.boi and batch["tokens"][0, 5 + n] == SPECIAL.eoi
    inputs = sequence.model_inputs(batch)

    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    logits, eps = jax.eval_shape(lambda p: model.apply({"params": p}, *inputs), abstract)
    assert logits.shape == (1, layout.seq_len, VOCAB)
    assert eps.shape == (1, layout.max_images, 8, 8, 8) and eps.dtype == jnp.float32
    encoder_params, decoder_params = abstract["patch_encoder"], abstract["patch_decoder"]
    if encoder == "linear":
      assert encoder_params["proj"]["kernel"].shape == (k * k * 8, 32)
      assert decoder_params["proj"]["kernel"].shape == (32, k * k * 8)
    else:                                                         # log2(k) halvings down, as many doublings up
      assert sorted(m for m in encoder_params if m.endswith("downsample")) == [
          f"down_{i}_downsample" for i in range(k.bit_length() - 1)]
      assert sorted(m for m in decoder_params if m.endswith("upsample")) == [
          f"up_{i}_upsample" for i in range(1, k.bit_length())]
      assert decoder_params["conv_out"]["kernel"].shape == (3, 3, 8, 8)

    if encoder == "linear" or k == 1:                             # the real forward where it compiles quickly
      rng = np.random.default_rng(k)
      params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
      _, eps = jax.jit(lambda p: model.apply({"params": p}, *inputs))(params)
      assert eps.shape == (1, layout.max_images, 8, 8, 8) and np.isfinite(eps).all()
      assert np.std(eps[0, 0]) > 1e-2                             # random weights: eps is not a constant


def test_output_shapes_and_attention_structure():
  model = make_model(tiny_model_config())
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  params = model.init(jax.random.key(0), *inputs)["params"]
  # The decoder is zero-initialised; randomise it so eps_hat depends on the sequence.
  params["patch_decoder"]["proj"]["kernel"] = jax.random.normal(jax.random.key(3), (32, 12))
  logits, eps = model.apply({"params": params}, *inputs)
  assert logits.shape == (2, 64, VOCAB) and logits.dtype == jnp.float32
  assert eps.shape == (2, LAYOUT.max_images, *LATENT)

  # Row 0 is [BOS c c c BOI p*16 EOI EOS | text]: change the text after the image ...
  tokens = batch["tokens"].copy()
  tokens[0, 23:] = 50
  logits2, eps2 = model.apply({"params": params}, tokens, *inputs[1:])
  np.testing.assert_allclose(eps2[0, 0], eps[0, 0], atol=1e-6)              # image never sees later text
  np.testing.assert_allclose(logits2[0, :23], logits[0, :23], atol=1e-5)
  # ... and the last patch: every patch of the image changes (bidirectional), earlier text does not.
  latents = batch["latents"].copy()
  latents[0, 0, -2:, -2:] += 1.0
  logits3, eps3 = model.apply({"params": params}, *inputs[:4], latents, inputs[5])
  changed = np.abs(patching.patchify(eps3[0, 0] - eps[0, 0], 2)).max(axis=-1) > 1e-6
  assert changed.all()
  np.testing.assert_allclose(logits3[0, :5], logits[0, :5], atol=1e-5)
  assert np.abs(logits3[0, 21] - logits[0, 21]).max() > 1e-4                 # EOI sees the image


def test_causal_image_attention_patches_see_only_earlier_patches():
  """model.image_attention = causal (paper Table 5's other arm): a change to the last patch reaches no earlier
  patch; a change to the first reaches all. The three attention implementations agree."""
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  apply = {}
  for attention in ("dense", "chunked", "dot_product"):
    model = make_model(tiny_model_config(image_attention="causal", attention=attention, attention_chunk=16))
    apply[attention] = jax.jit(lambda p, *x, model=model: model.apply({"params": p}, *x))
  params = make_model(tiny_model_config()).init(jax.random.key(0), *inputs)["params"]
  params["patch_decoder"]["proj"]["kernel"] = jax.random.normal(jax.random.key(3), (32, 12))
  logits, eps = apply["dense"](params, *inputs)
  for attention in ("chunked", "dot_product"):
    other_logits, other_eps = apply[attention](params, *inputs)
    np.testing.assert_allclose(other_eps, eps, atol=1e-5)
    np.testing.assert_allclose(other_logits, logits, atol=1e-4)
  with pytest.raises(ValueError, match=r"image_attention must be one of \('bidirectional', 'causal'\), got 'sideways'"):
    transformer.TransformerConfig(2, 32, 4, 64, image_attention="sideways")
  for corner, earlier_changes in (((-2, None), False), ((0, 2), True)):
    latents = batch["latents"].copy()
    latents[0, 0, slice(*corner), slice(*corner)] += 1.0                   # the last / first 2x2 patch
    _, eps2 = apply["dense"](params, *inputs[:4], latents, inputs[5])
    changed = np.abs(patching.patchify(eps2[0, 0] - eps[0, 0], 2)).max(axis=-1) > 1e-6
    assert changed[-1] and changed[0] == earlier_changes and changed[1:-1].all() == earlier_changes
    assert not changed[1:-1].any() or earlier_changes


@pytest.mark.parametrize("prediction,ratio", [("eps", 0.45), ("v", 0.75)])
def test_tiny_model_overfits_one_batch(prediction, ratio):
  """Text and image losses fall on one repeated batch (of N(0, 1) latents, so the v and eps targets both start
  at unit variance; v needs x0 at every t and falls more slowly)."""
  mesh = sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
  config = tiny_model_config()
  config.optim.lr = 1e-2
  config.diffusion.prediction = prediction
  _, state, step = init_state(config, mesh, total_steps=300)
  _, history = run_steps(mesh, state, step, tiny_batch(), 300)
  first, last = history[0], np.mean([h["image_loss"] for h in history[-20:]])
  assert first["text_loss"] > 3.5 and history[-1]["text_loss"] < 0.1 * first["text_loss"]
  assert first["image_loss"] > 0.9 and last < ratio * first["image_loss"]
  # Row 0: 5 (caption-first doc) + 19 (text); row 1: 4 (text) + 4 (image-first doc) + 3.
  assert first["text_targets"] == 5 + 19 + 4 + 4 + 3 and first["images"] == 3


@pytest.mark.parametrize("axes", [dict(ici_data_parallelism=8, ici_fsdp_parallelism=1, ici_tensor_parallelism=1),
                                  dict(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)])
def test_sharded_step_equals_single_device(axes):
  config = tiny_model_config()
  batch = {k: np.concatenate([v] * 4) for k, v in tiny_batch().items()}       # 8 rows
  single = sharding.make_mesh(config.mesh, jax.devices()[:1])
  _, s1, step1 = init_state(config, single)
  s1, h1 = run_steps(single, s1, step1, batch, 3)
  config.mesh.update(axes)
  mesh = sharding.make_mesh(config.mesh)
  _, s8, step8 = init_state(config, mesh)
  assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
  s8, h8 = run_steps(mesh, s8, step8, batch, 3)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), jax.device_get(s1.params),
               jax.device_get(s8.params))


def test_unet_patch_encoder_under_the_transfusion_mask_and_sharded():
  config = tiny_model_config(patch_encoder="unet", unet_channels=(8, 16), unet_res_blocks=1)
  model = make_model(config)
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
  assert {"conv_in", "proj_out"} <= set(params["patch_encoder"]) and "conv_out" in params["patch_decoder"]
  params["patch_decoder"]["conv_out"]["kernel"] = jax.random.normal(jax.random.key(3), (3, 3, 8, 3))
  apply = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
  logits, eps = apply(params, *inputs)
  assert eps.shape == (2, LAYOUT.max_images, *LATENT)
  tokens = batch["tokens"].copy()
  tokens[0, 23:] = 50                                             # text after row 0's image
  _, eps2 = apply(params, tokens, *inputs[1:])
  np.testing.assert_allclose(eps2[0, 0], eps[0, 0], atol=1e-6)
  latents = batch["latents"].copy()
  latents[0, 0, 0, 0] += 1.0                                      # one latent pixel of the image
  logits3, _ = apply(params, *inputs[:4], latents, inputs[5])
  np.testing.assert_allclose(logits3[0, :5], logits[0, :5], atol=1e-5)
  assert np.abs(logits3[0, 21] - logits[0, 21]).max() > 1e-5      # EOI sees the image

  batch8 = {k: np.concatenate([v] * 4) for k, v in batch.items()}
  single = sharding.make_mesh(config.mesh, jax.devices()[:1])
  _, s1, step1 = init_state(config, single)
  _, h1 = run_steps(single, s1, step1, batch8, 2)
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism = 2, 4
  mesh = sharding.make_mesh(config.mesh)
  _, s8, step8 = init_state(config, mesh)
  assert s8.params["patch_encoder"]["conv_in"]["kernel"].sharding.spec[-1] == "fsdp"
  _, h8 = run_steps(mesh, s8, step8, batch8, 2)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)


@pytest.mark.parametrize("options", [dict(), dict(decoder_input="pre_norm"), dict(decoder_head="adaln_zero"),
                                     dict(decoder_skip=True)])
def test_decoder_options_start_at_zero(options):
  """Every patch decoder option is zero-initialised: a fresh model predicts 0, as the paper's decoder does."""
  model = make_model(tiny_model_config(**options))
  inputs = sequence.model_inputs(tiny_batch())
  params = model.init(jax.random.key(0), *inputs)["params"]
  _, out = model.apply({"params": params}, *inputs)
  np.testing.assert_array_equal(out, 0.0)


def test_decoder_input_and_skip_read_what_they_say():
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  outputs = {}
  for name, options in (("final_norm", {}), ("pre_norm", dict(decoder_input="pre_norm"))):
    model = make_model(tiny_model_config(**options))
    params = model.init(jax.random.key(0), *inputs)["params"]
    params["patch_decoder"]["proj"]["kernel"] = jax.random.normal(jax.random.key(3), (32, 12))
    zero_norm = jax.tree.map(lambda x: x, params)
    zero_norm["transformer"]["final_norm"]["scale"] = jnp.zeros(32)
    outputs[name] = [model.apply({"params": p}, *inputs)[1] for p in (params, zero_norm)]
  # The final norm's scale reaches the final_norm decoder only; pre_norm reads the stream before it.
  assert np.abs(outputs["final_norm"][0]).max() > 1e-2
  np.testing.assert_array_equal(outputs["final_norm"][1], 0.0)
  np.testing.assert_array_equal(outputs["pre_norm"][1], outputs["pre_norm"][0])
  assert np.abs(outputs["pre_norm"][0] - outputs["final_norm"][0]).max() > 1e-2

  # A skip gain of 1 on every channel and time step copies the noisy input to the output.
  model = make_model(tiny_model_config(decoder_skip=True))
  params = model.init(jax.random.key(0), *inputs)["params"]
  params["patch_decoder"]["skip_gain"]["bias"] = jnp.ones(12)
  _, out = model.apply({"params": params}, *inputs)
  np.testing.assert_allclose(out, batch["latents"], atol=1e-6)

  # adaln_zero: a modulation scale of -1 zeroes the normalised stream, so only the bias of proj remains.
  model = make_model(tiny_model_config(decoder_head="adaln_zero"))
  params = model.init(jax.random.key(0), *inputs)["params"]
  params["patch_decoder"]["proj"]["kernel"] = jax.random.normal(jax.random.key(3), (32, 12))
  _, out = model.apply({"params": params}, *inputs)
  assert np.abs(out).max() > 1e-2
  params["patch_decoder"]["modulation"]["bias"] = jnp.concatenate([jnp.zeros(32), -jnp.ones(32)])
  _, out = model.apply({"params": params}, *inputs)
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_ema_of_the_params_follows_its_recursion():
  """ema_0 = params_0; ema_{s+1} = d_s ema_s + (1 - d_s) params_{s+1} with d_s = min(decay, (1 + s) / (10 + s))."""
  mesh = sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
  config = tiny_model_config()
  model = make_model(config)
  tx, schedule = optim.make_optimizer(config.optim, 100)
  state, shardings = state_lib.create_train_state(model, tx, sequence.dummy_batch(1, LAYOUT), jax.random.key(0),
                                                  mesh, ema=True)
  step = step_lib.jit_train_step(mesh, shardings, model=model, tx=tx, schedule=schedule,
                                 alpha_bar=diffusion.cosine_alpha_bar(1000), loss_weight=5.0,
                                 train_key=jax.random.key(1), ema_decay=0.5)
  leaf = lambda tree: np.asarray(tree["patch_encoder"]["proj"]["kernel"], np.float64)  # noqa: E731
  expected = leaf(state.params)
  np.testing.assert_array_equal(leaf(state.ema_params), expected)
  batch = tiny_batch()
  for s in range(12):
    with jax.set_mesh(mesh):
      state, _ = step(state, batch)
    d = min(0.5, (1 + s) / (10 + s))
    expected = d * expected + (1 - d) * leaf(state.params)
    assert state.sampling_params is state.ema_params
  np.testing.assert_allclose(leaf(state.ema_params), expected, rtol=1e-5, atol=1e-7)
  assert np.abs(leaf(state.ema_params) - leaf(state.params)).max() > 1e-4


# ---- Chameleon's stability recipe: QK-norm, norm on the branch outputs, z-loss (all off by default). -----------
def randomised_norm_scales(params, seed=5):
  """params with every RMSNorm scale drawn from U(0.5, 1.5), so a scale that were not applied, or applied at the
  wrong place (e.g. after RoPE, which mixes dims i and i + Dh / 2), shows."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=1.5)
      if "scale" in jax.tree_util.keystr(path) else x, params)


def reference_block(p, x, segment_ids, image_ids, positions, placement, qk_norm, eps=1e-5, theta=10_000.0):
  """One Block written out in float64 numpy from the formulas: p are the layer's params, x [B, L, D]."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x = f64(x)

  def rms_norm(v, scale):
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * f64(scale)

  def rope(v):
    half = v.shape[-1] // 2
    angles = f64(positions)[..., None] * theta ** (-np.arange(half) / half)
    sin, cos = np.sin(angles)[:, :, None], np.cos(angles)[:, :, None]
    return np.concatenate([v[..., :half] * cos - v[..., half:] * sin, v[..., half:] * cos + v[..., :half] * sin], -1)

  def attention(h):
    a = p["attention"]
    q, k, v = (np.einsum("bld,dhk->blhk", h, f64(a[n]["kernel"])) for n in ("query", "key", "value"))
    if qk_norm:
      q, k = rms_norm(q, a["query_norm"]["scale"]), rms_norm(k, a["key_norm"]["scale"])
    q, k = rope(q), rope(k)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.asarray(masks.transfusion_mask(jnp.asarray(segment_ids), jnp.asarray(image_ids)))[:, None]
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)
    return np.einsum("blhk,hkd->bld", out, f64(a["out"]["kernel"]))

  def mlp(h):
    m = p["mlp"]
    gate, up = h @ f64(m["gate"]["kernel"]), h @ f64(m["up"]["kernel"])
    return (gate / (1 + np.exp(-gate)) * up) @ f64(m["down"]["kernel"])

  norm = lambda name, v: rms_norm(v, p[name]["scale"])  # noqa: E731
  if placement == "pre":
    x = x + attention(norm("attention_norm", x))
    return x + mlp(norm("mlp_norm", x))
  x = x + norm("attention_norm", attention(x))
  return x + norm("mlp_norm", mlp(x))


@pytest.mark.parametrize("placement", transformer.NORM_PLACEMENTS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["no_qk_norm", "qk_norm"])
def test_block_equals_the_hand_written_reference(placement, qk_norm):
  """Every combination of model.norm_placement and model.qk_norm, the defaults (pre, no QK-norm) included, on the
  packed tiny batch with random norm scales."""
  cfg = transformer.TransformerConfig(2, 32, 4, 64, qk_norm=qk_norm, norm_placement=placement)
  batch = tiny_batch()
  ids = [jnp.asarray(batch[k]) for k in ("segment_ids", "image_ids", "positions")]
  x = jax.random.normal(jax.random.key(2), (2, 64, 32))
  block = transformer.Block(cfg)
  params = randomised_norm_scales(nn.meta.unbox(block.init(jax.random.key(0), x, *ids)["params"]))
  assert ("query_norm" in params["attention"]) == ("key_norm" in params["attention"]) == qk_norm
  got, kv = block.apply({"params": params}, x, *ids)
  assert kv is None
  np.testing.assert_allclose(got, reference_block(params, x, *[batch[k] for k in ("segment_ids", "image_ids",
                                                                                 "positions")], placement, qk_norm),
                             rtol=1e-5, atol=1e-5)


def test_unknown_norm_placement_is_refused():
  with pytest.raises(ValueError, match=r"norm_placement must be one of \('pre', 'branch_output'\), got 'post'"):
    transformer.TransformerConfig(2, 32, 4, 64, norm_placement="post")


def test_qk_norm_makes_each_heads_queries_and_keys_unit_rms_before_rope():
  # By hand: head 0 of [3, 4, 0, 0] has rms 2.5 -> [1.2, 1.6, 0, 0]; head 1 of [1, 1, 1, 1] is already unit rms.
  norm = transformer.RMSNorm(1e-5, jnp.float32, jnp.float32, axis="kv")
  q = jnp.array([[[[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]])            # [B=1, L=1, H=2, Dh=4]
  variables = norm.init(jax.random.key(0), q)
  assert variables["params"]["scale"].names == ("kv",) and variables["params"]["scale"].value.shape == (4,)
  np.testing.assert_allclose(norm.apply(variables, q), [[[[1.2, 1.6, 0, 0], [1, 1, 1, 1]]]], rtol=1e-5)

  # In the model, the per-layer scales carry the logical names (layers, kv); the default has no QK-norm params.
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  layer = make_model(tiny_model_config(qk_norm=True)).init(jax.random.key(0), *inputs)["params"]["transformer"][
      "layers"]["attention"]
  assert layer["query_norm"]["scale"].names == layer["key_norm"]["scale"].names == ("layers", "kv")
  assert "query_norm" not in make_model(tiny_model_config()).init(jax.random.key(0), *inputs)["params"][
      "transformer"]["layers"]["attention"]

  # The queries and keys entering RoPE are, for every (row, element, head), x W / rms(x W) * scale.
  attention = transformer.Attention(transformer.TransformerConfig(2, 32, 4, 64, qk_norm=True))
  ids = [jnp.asarray(batch[k]) for k in ("segment_ids", "image_ids", "positions")]
  x = jax.random.normal(jax.random.key(2), (2, 64, 32))
  params = randomised_norm_scales(nn.meta.unbox(attention.init(jax.random.key(0), x, *ids)["params"]))
  _, state = attention.apply({"params": params}, x, *ids, capture_intermediates=True)
  for name in ("query", "key"):
    projected = state["intermediates"][name]["__call__"][0]                 # [B, L, H, Dh]
    normed = state["intermediates"][f"{name}_norm"]["__call__"][0]
    scale = params[f"{name}_norm"]["scale"]
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(normed / scale), axis=-1)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(normed, projected / np.sqrt(np.mean(np.square(projected), -1, keepdims=True) + 1e-5)
                               * scale, rtol=1e-5, atol=1e-6)


def test_chameleon_recipe_model_agrees_across_attention_implementations():
  """QK-norm and the branch-output norms sit outside the attention kernel: dense, chunked (block-skipping) and
  jax.nn.dot_product_attention give one function."""
  batch = tiny_batch()
  inputs = sequence.model_inputs(batch)
  recipe = dict(qk_norm=True, norm_placement="branch_output")
  params = make_model(tiny_model_config(**recipe)).init(jax.random.key(0), *inputs)["params"]
  params = randomised_norm_scales(nn.meta.unbox(params))
  params["patch_decoder"]["proj"]["kernel"] = jax.random.normal(jax.random.key(3), (32, 12))
  outputs = {}
  for attention in ("dense", "chunked", "dot_product"):
    model = make_model(tiny_model_config(attention=attention, attention_chunk=16, **recipe))
    outputs[attention] = jax.jit(lambda p, *x, model=model: model.apply({"params": p}, *x))(params, *inputs)
  for attention in ("chunked", "dot_product"):
    np.testing.assert_allclose(outputs[attention][0], outputs["dense"][0], atol=1e-4)
    np.testing.assert_allclose(outputs[attention][1], outputs["dense"][1], atol=1e-5)
  default_logits, _ = make_model(tiny_model_config()).apply({"params": params}, *inputs)   # ignores the QK scales
  assert np.abs(default_logits - outputs["dense"][0]).max() > 1e-2


def test_z_loss_is_the_squared_log_normaliser():
  # log Z of [0, 0, 0, 0] is log 4; of [1, 2, 3] it is 3 + log(1 + e^-1 + e^-2); of [1000, 1000] 1000 + log 2
  # (computed stably: a naive log(sum(exp)) overflows).
  logits = jnp.array([[[0.0, 0.0, 0.0, -np.inf], [1.0, 2.0, 3.0, -np.inf], [1000.0, 1000.0, -np.inf, -np.inf]]])
  want = [np.log(3.0) ** 2, (3 + np.log(1 + np.exp(-1) + np.exp(-2))) ** 2, (1000 + np.log(2.0)) ** 2]
  np.testing.assert_allclose(objective.z_loss(logits), [want], rtol=1e-6)
  np.testing.assert_allclose(objective.z_loss(jnp.zeros((1, 1, 4))), [[np.log(4.0) ** 2]], rtol=1e-6)


def test_z_loss_enters_the_loss_metrics_and_gradients():
  """L = text_loss + 5 image_loss + w z_loss with z_loss the mean of log(Z)^2 over text targets (computed here from
  the model's logits); the gradient changes by exactly w times the z_loss gradient; microbatches agree; w = 0
  computes and logs no z-loss."""
  model = make_model(tiny_model_config())
  batch = tiny_batch()
  params = nn.meta.unbox(model.init(jax.random.key(0), *sequence.model_inputs(batch))["params"])
  alpha_bar = jnp.asarray(diffusion.cosine_alpha_bar(1000), jnp.float32)
  key = jax.random.key(4)
  run = lambda w, k=1: jax.jit(lambda p: step_lib.loss_and_grads(  # noqa: E731
      p, batch, key, model=model, alpha_bar=alpha_bar, loss_weight=5.0, z_loss_weight=w, microbatches=k))(params)

  def mean_z(p):
    t, eps = step_lib.draw_noise(key, batch)
    logits, _, _ = objective.forward(p, batch, t, eps, model=model, alpha_bar=alpha_bar)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(lse * lse * batch["text_loss_mask"]) / batch["text_loss_mask"].sum()

  off, grads_off = run(0.0)
  on, grads_on = run(0.01)
  assert "z_loss" not in off
  z = float(mean_z(params))
  assert z > 10.0                                       # log Z ~ log 64 = 4.2 at init: log(Z)^2 ~ 17
  np.testing.assert_allclose(on["z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(on["loss"], on["text_loss"] + 5.0 * on["image_loss"] + 0.01 * z, rtol=1e-6)
  np.testing.assert_allclose(on["loss"] - off["loss"], 0.01 * z, rtol=1e-4)
  expected = jax.tree.map(lambda a, g: a + 0.01 * g, grads_off, jax.grad(mean_z)(params))
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7), grads_on, expected)
  head = lambda g: np.asarray(g["lm_head"]["kernel"])  # noqa: E731
  assert np.abs(head(grads_on) - head(grads_off)).max() > 1e-4
  accumulated, grads_accumulated = run(0.01, k=2)
  np.testing.assert_allclose(accumulated["z_loss"], on["z_loss"], rtol=1e-5)
  np.testing.assert_allclose(accumulated["loss"], on["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_accumulated, grads_on)
