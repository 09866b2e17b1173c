"""Mixed-modal decoding: the KV cache against full recomputation, samplers against their formulas,
guidance, causality of image blocks, sharding, and compilation counts."""
import collections
import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion, sharding, spec as spec_lib
from tfusion.data import sequence
from tfusion.inference import decoding, sampler as sampler_lib
from tfusion.models import transformer, transfusion
from tests.helpers import LATENT, SPECIAL, VOCAB, make_model, tiny_model_config

AB = diffusion.cosine_alpha_bar(1000)
N = 16                                   # patches per image of the tiny model (8x8 latent, 2x2 patches)
OPTS = decoding.SamplingOptions(diffusion_steps=4, max_new_tokens=8, max_images=2, clip_x0=3.0)


@pytest.fixture(scope="module")
def model_and_params():
  model = make_model(tiny_model_config())
  rows = np.zeros((1, 24), np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), rows, rows, rows, rows, np.zeros((1, 1, *LATENT), np.float32),
                                    np.zeros((1, 1), np.int32))["params"])
  # A zero-initialised patch decoder predicts eps = 0 everywhere; give it weights so images depend on inputs.
  params["patch_decoder"]["proj"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(1), (32, 12))
  # Make BOI a frequent draw, so interleaved rows open images in the middle of their text.
  kernel = params["lm_head"]["kernel"]
  params["lm_head"]["kernel"] = kernel.at[:, SPECIAL.boi].set(4 * kernel[:, SPECIAL.boi])
  return model, params


@pytest.fixture(scope="module")
def causal_model_and_params(model_and_params):
  """The tiny model's params under model.image_attention = causal."""
  return make_model(tiny_model_config(image_attention="causal")), model_and_params[1]


@pytest.fixture(scope="module")
def chameleon_model_and_params(model_and_params):
  """The tiny model under Chameleon's recipe (QK-norm, norms on the branch outputs): the linear model's params plus
  QK-norm scales, every norm scale drawn from U(0.5, 1.5) so that keys cached before or after their norm differ."""
  model = make_model(tiny_model_config(qk_norm=True, norm_placement="branch_output"))
  rows = np.zeros((1, 24), np.int32)
  stack = nn.meta.unbox(model.init(jax.random.key(0), rows, rows, rows, rows, np.zeros((1, 1, *LATENT), np.float32),
                                   np.zeros((1, 1), np.int32))["params"]["transformer"])
  keys = iter(jax.random.split(jax.random.key(2), 16))
  stack = jax.tree_util.tree_map_with_path(lambda path, x: jax.random.uniform(next(keys), x.shape, minval=0.5,
                                                                              maxval=1.5)
                                           if "scale" in jax.tree_util.keystr(path) else x, stack)
  return model, dict(model_and_params[1], transformer=stack)


@pytest.fixture(scope="module")
def unet_model_and_params():
  """The tiny model with U-Net patch encoder and decoder (2x2 patches: two levels)."""
  model = make_model(tiny_model_config(patch_encoder="unet", unet_channels=(8, 16), unet_res_blocks=1))
  rows, latents = np.zeros((1, 24), np.int32), np.zeros((1, 1, *LATENT), np.float32)
  # An rbg key: the jitted init compiles in a third of the time it takes with threefry on CPU.
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), rows, rows, rows, rows, latents,
                                             np.zeros((1, 1), np.int32))["params"])
  # The U-Net decoder's last conv is zero-initialised, as the linear decoder: give it weights.
  params["patch_decoder"]["conv_out"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(1), (3, 3, 8, 3))
  return model, params


@pytest.fixture(scope="module")
def discrete_model_and_params():
  """The tiny model with discrete images (the Chameleon baseline): 4x4 grids of 16 codes after the 64 text ids, BOI
  made a frequent draw."""
  config = tiny_model_config()
  config.data.codec, config.data.codebook_size, config.data.latent_downsample, config.model.patch_size = "vq", 16, 2, 1
  model = spec_lib.resolve(config).transfusion(VOCAB)
  rows = np.zeros((1, 24), np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), rows, rows, rows, rows, np.zeros((1, 0, 4, 4, 1), np.float32),
                                    np.zeros((1, 0), np.int32))["params"])
  kernel = params["lm_head"]["kernel"]
  params["lm_head"]["kernel"] = kernel.at[:, SPECIAL.boi].set(4 * kernel[:, SPECIAL.boi])
  return model, params


def text_prompt(*ids, boi=False):
  return [sequence.TextPiece(np.array([SPECIAL.bos, *ids] + ([SPECIAL.boi] if boi else []), np.int32))]


def image_prompt(seed):
  latents = np.random.default_rng(seed).uniform(-1, 1, LATENT).astype(np.float32)
  return [sequence.TextPiece(np.array([SPECIAL.bos], np.int32)), sequence.ImagePiece(latents, 0)]


def decode(model_and_params, prompts, task, options=OPTS, key=0, **kwargs):
  model, params = model_and_params
  return decoding.decode(model, params, prompts, task, SPECIAL, AB, options, jax.random.key(key), **kwargs)


def assert_same(a: list, b: list, atol=1e-4):
  for x, y in zip(a, b, strict=True):
    assert x.tokens == y.tokens and x.image_positions == y.image_positions
    np.testing.assert_allclose(x.images, y.images, atol=atol)


# ----------------------------------------------------------------------------------------------
# Cached and uncached decoding agree.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [OPTS, dataclasses.replace(OPTS, temperature=1.0, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_text_cached_equals_uncached(model_and_params, options):
  prompts = [text_prompt(10, 11, 12), text_prompt(40), image_prompt(0)]
  cached = decode(model_and_params, prompts, decoding.TEXT, options)
  assert_same(cached, decode(model_and_params, prompts, decoding.TEXT, options, cached=False))
  assert [len(g.tokens) for g in cached] == [8, 8, 8] and all(g.images.shape == (0, *LATENT) for g in cached)
  assert all(0 <= t < VOCAB and t not in (SPECIAL.boi, SPECIAL.eoi, SPECIAL.pad) for g in cached for t in g.tokens)


@pytest.mark.parametrize("models, sampler", [("model_and_params", "ddpm"), ("model_and_params", "ddim"),
                                             ("unet_model_and_params", "ddpm"), ("causal_model_and_params", "ddpm")],
                         ids=["linear-ddpm", "linear-ddim", "unet-ddpm", "causal-images-ddpm"])
def test_image_cached_equals_uncached_with_guidance(request, models, sampler):
  model_and_params = request.getfixturevalue(models)
  options = dataclasses.replace(OPTS, sampler=sampler, cfg_scale=3.0)
  prompts = [text_prompt(10, 11, 12, boi=True), text_prompt(boi=True), text_prompt(40, 41, boi=True)]
  cached = decode(model_and_params, prompts, decoding.IMAGE, options)
  assert_same(cached, decode(model_and_params, prompts, decoding.IMAGE, options, cached=False))
  assert all(g.images.shape == (1, *LATENT) and g.tokens == [] and g.image_positions == [0] for g in cached)
  assert all(np.isfinite(g.images).all() for g in cached)
  assert np.abs(cached[0].images - cached[2].images).max() > 1e-2     # different captions, different images


@pytest.mark.parametrize("models", ["model_and_params", "chameleon_model_and_params"], ids=["llama", "chameleon"])
def test_interleaved_cached_equals_uncached(request, models):
  model_and_params = request.getfixturevalue(models)
  options = dataclasses.replace(OPTS, temperature=1.0, cfg_scale=2.0, max_new_tokens=12)
  prompts = [text_prompt(10, 11), text_prompt(20, 21, 22, boi=True), text_prompt(30), text_prompt(31)]
  cached = decode(model_and_params, prompts, decoding.INTERLEAVED, options)
  assert_same(cached, decode(model_and_params, prompts, decoding.INTERLEAVED, options, cached=False))
  # The forced image comes first; other rows open images mid-text; no row exceeds its image budget.
  assert cached[1].image_positions[0] == 0
  assert any(0 < p < len(g.tokens) for g in cached for p in g.image_positions)
  assert all(len(g.images) <= 2 and len(g.images) == len(g.image_positions) for g in cached)


def test_discrete_images_cached_equals_uncached_with_guidance(discrete_model_and_params):
  options = dataclasses.replace(OPTS, temperature=1.0, cfg_scale=2.0, image_top_k=5, max_new_tokens=12)
  prompts = [text_prompt(10, 11), text_prompt(20, 21, 22, boi=True), text_prompt(30), text_prompt(31)]
  cached = decode(discrete_model_and_params, prompts, decoding.INTERLEAVED, options)
  assert_same(cached, decode(discrete_model_and_params, prompts, decoding.INTERLEAVED, options, cached=False), atol=0)
  assert cached[1].image_positions[0] == 0 and any(0 < p for g in cached for p in g.image_positions)
  codes = np.concatenate([g.images for g in cached])
  assert codes.shape[1:] == (4, 4, 1) and len(np.unique(codes)) > 5 and set(np.unique(codes)) <= set(range(16))
  assert all(t < VOCAB for g in cached for t in g.tokens)           # text never draws a code


def test_causal_image_attention_changes_images_and_captions(model_and_params, causal_model_and_params):
  """Same params, the other mask: the drawn image and the caption of a given image both change, and the cache
  still equals full recomputation for captions."""
  prompts = [text_prompt(10, 11, 12, boi=True)]
  images = [decode(m, prompts, decoding.IMAGE)[0].images for m in (model_and_params, causal_model_and_params)]
  assert np.abs(images[0] - images[1]).max() > 1e-3
  captions = [image_prompt(0), image_prompt(1)]
  cached = decode(causal_model_and_params, captions, decoding.TEXT)
  assert_same(cached, decode(causal_model_and_params, captions, decoding.TEXT, cached=False))


def test_text_after_an_image_depends_on_the_image(model_and_params):
  """The finished image enters the cache: text decoded after it changes with the image."""
  first, second = (decode(model_and_params, [image_prompt(s)], decoding.TEXT)[0].tokens for s in (0, 1))
  assert first != second


def test_greedy_caption_matches_full_model_reference(model_and_params):
  model, params = model_and_params
  prompt = image_prompt(3)
  got = decode(model_and_params, [prompt], decoding.TEXT)[0].tokens
  # Reference: rerun the model on the whole sequence for every token, argmax over allowed ids.
  layout = sequence.RowLayout(64, LATENT, 2)
  tokens = []
  for _ in range(8):
    row = sequence.RowBuilder(layout, SPECIAL, 0)
    row.add(prompt + [sequence.TextPiece(np.array(tokens or [], np.int32))] if tokens else prompt)
    a = row.arrays()
    logits, _ = model.apply({"params": params}, *(a[k][None] for k in ("tokens", "segment_ids", "positions",
                                                                         "image_ids")),
                            a["latents"][None], np.full((1, layout.max_images), sequence.CONTEXT_TIMESTEP, np.int32))
    step_logits = np.array(logits[0, row.length - 1])
    step_logits[[SPECIAL.pad, SPECIAL.bos, SPECIAL.eoi, SPECIAL.boi]] = -np.inf
    tokens.append(int(np.argmax(step_logits)))
  assert got == tokens


def test_caption_task_bans_eos_only_as_the_first_token():
  first_token = jnp.array([True, False])
  may_draw_image = jnp.array([False, False])
  text = decoding._banned(16, SPECIAL, decoding.TEXT, may_draw_image, first_token)
  caption = decoding._banned(16, SPECIAL, decoding.CAPTION, may_draw_image, first_token)
  assert not text[:, SPECIAL.eos].any()
  assert caption[:, SPECIAL.eos].tolist() == [True, False]
  differs = np.argwhere(np.asarray(caption != text))
  assert differs.tolist() == [[0, SPECIAL.eos]]
  for banned in (text, caption):                     # PAD, BOS, EOI, and BOI without an image budget
    assert banned[:, [SPECIAL.pad, SPECIAL.bos, SPECIAL.eoi, SPECIAL.boi]].all()


# ----------------------------------------------------------------------------------------------
# Samplers against their formulas, guidance.
# ----------------------------------------------------------------------------------------------
def reference_image(model, params, caption, sampler, steps, key, row=0):
  """Denoise [BOS caption BOI image] by calling the model on the whole sequence, with the posterior
  written here from Ho et al. (2020) eq. 6-7 (DDPM, respaced) or Song et al. (2021) eq. 12 (DDIM, eta 0),
  in float64."""
  layout = sequence.RowLayout(len(caption) + 1 + N + 2, LATENT, 2)
  row_builder = sequence.RowBuilder(layout, SPECIAL, 1000)
  row_builder.add([sequence.TextPiece(np.array([SPECIAL.bos, *caption], np.int32)),
                   sequence.ImagePiece(np.zeros(LATENT, np.float32), 1000)])
  a = row_builder.arrays()
  image_key = jax.random.fold_in(jax.random.fold_in(key, row), 1_000_000)
  x = np.asarray(jax.random.normal(image_key, LATENT), np.float64)
  ts = diffusion.respaced_timesteps(1000, steps)
  for i in range(steps):
    t, s = ts[i], ts[i + 1]
    _, out = model.apply({"params": params}, *(a[k][None] for k in ("tokens", "segment_ids", "positions",
                                                                      "image_ids")),
                         x[None, None].astype(np.float32), np.full((1, 1), t, np.int32))
    out = np.asarray(out[0, 0], np.float64)
    if model.cfg.prediction == "eps":
      eps = out
      x0 = np.clip((x - np.sqrt(1 - AB[t]) * eps) / np.sqrt(AB[t]), -3.0, 3.0)
    else:                                            # Salimans & Ho (2022), v = sqrt(a) eps - sqrt(1 - a) x0
      x0 = np.clip(np.sqrt(AB[t]) * x - np.sqrt(1 - AB[t]) * out, -3.0, 3.0)
    if sampler == "ddim":
      eps = (x - np.sqrt(AB[t]) * x0) / np.sqrt(1 - AB[t])
      x = np.sqrt(AB[s]) * x0 + np.sqrt(1 - AB[s]) * eps
    else:
      beta = 1 - AB[t] / AB[s]
      mean = np.sqrt(AB[s]) * beta / (1 - AB[t]) * x0 + np.sqrt(1 - beta) * (1 - AB[s]) / (1 - AB[t]) * x
      noise = np.asarray(jax.random.normal(jax.random.fold_in(image_key, i), LATENT), np.float64)
      x = mean + np.sqrt(beta * (1 - AB[s]) / (1 - AB[t])) * noise
  return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_sampler_matches_the_formula_reference(model_and_params, sampler, prediction):
  model, params = model_and_params
  model = transfusion.Transfusion(dataclasses.replace(model.cfg, prediction=prediction))
  options = dataclasses.replace(OPTS, sampler=sampler, ddim_eta=0.0)
  got = decode((model, params), [text_prompt(10, 11, boi=True)], decoding.IMAGE, options, key=7)[0].images[0]
  # float32 against float64 through four calls of a random network (its input Jacobian is large): allow 2e-3.
  np.testing.assert_allclose(got, reference_image(model, params, [10, 11], sampler, 4, jax.random.key(7)),
                             atol=2e-3)


def test_ddim_eta_0_is_deterministic_and_eta_1_is_not(model_and_params):
  prompts = [text_prompt(10, boi=True)]
  runs = {eta: [decode(model_and_params, prompts, decoding.IMAGE,
                       dataclasses.replace(OPTS, sampler="ddim", ddim_eta=eta), key=3)[0].images for _ in range(2)]
          for eta in (0.0, 1.0)}
  np.testing.assert_array_equal(*runs[0.0])
  ddpm = decode(model_and_params, prompts, decoding.IMAGE, OPTS, key=3)[0].images
  np.testing.assert_allclose(runs[1.0][0], ddpm, atol=1e-4)          # eta = 1 is the DDPM posterior
  assert np.abs(runs[0.0][0] - ddpm).max() > 1e-2


@pytest.mark.parametrize("models, cached, first_images", [
    ("model_and_params", True, [0, 0, 2, 3]), ("model_and_params", False, [0, 0, 2, 3]),
    ("discrete_model_and_params", True, [3, 0, None, None]), ("discrete_model_and_params", False, [3, 0, None, None]),
], ids=["latents-cached", "latents-full", "codes-cached", "codes-full"])
def test_guidance_scale_0_draws_the_unconditional_image(request, models, cached, first_images):
  """At w = 0 the guided prediction is the partner's alone: a row's first image is the one an unguided [BOS BOI] row
  draws with the same noise, whatever the caption or text before it. So the partner sees [BOS BOI image] and nothing
  of its row's text, in every phase."""
  model_and_params = request.getfixturevalue(models)
  options = dataclasses.replace(OPTS, temperature=1.0, max_new_tokens=12)
  unconditional = decode(model_and_params, [text_prompt(boi=True)] * 4, decoding.IMAGE, options, cached=cached)
  captions = [text_prompt(10, 11, 12, boi=True), text_prompt(boi=True), text_prompt(40, 41, boi=True),
              text_prompt(50, boi=True)]
  conditional = decode(model_and_params, captions, decoding.IMAGE, options, cached=cached)
  assert np.abs(conditional[0].images - unconditional[0].images).max() > 0.5      # the caption matters at w = 1
  guided = dict(cached=cached, options=dataclasses.replace(options, cfg_scale=0.0))
  images = decode(model_and_params, captions, decoding.IMAGE, **guided)
  interleaved = decode(model_and_params, [text_prompt(10, 11), text_prompt(20, 21, 22, boi=True), text_prompt(30),
                                          text_prompt(31)], decoding.INTERLEAVED, **guided)
  # Where each row's first image comes (None: no image) after the text it draws first.
  assert [g.image_positions[0] if g.image_positions else None for g in interleaved] == first_images
  for generations in (images, interleaved):
    for g, u in zip(generations, unconditional):
      if len(g.images):
        np.testing.assert_allclose(g.images[0], u.images[0], atol=1e-5)


def test_guidance_scale_1_equals_the_conditional_pass(model_and_params):
  prompts = [text_prompt(10, 11, boi=True), text_prompt(12, boi=True)]
  options = dataclasses.replace(OPTS, cfg_scale=1.0)
  plain = decode(model_and_params, prompts, decoding.IMAGE, options)
  assert_same(plain, decode(model_and_params, prompts, decoding.IMAGE, options, guided=True), atol=1e-5)
  guided = decode(model_and_params, prompts, decoding.IMAGE, dataclasses.replace(OPTS, cfg_scale=3.0))
  assert np.abs(guided[0].images - plain[0].images).max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Masking, sharding, compilation, options.
# ----------------------------------------------------------------------------------------------
def test_image_block_never_attends_to_later_positions(model_and_params):
  model, params = model_and_params
  layout = sequence.RowLayout(48, LATENT, 2)
  latents = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)
  eps_of = []
  for after in ([20, 21, 22], [50, 51, 52, 53, 54]):                # image-first document, different captions
    row = sequence.RowBuilder(layout, SPECIAL, 1000)
    row.add([sequence.TextPiece(np.array([SPECIAL.bos], np.int32)), sequence.ImagePiece(latents, 500),
             sequence.TextPiece(np.array(after, np.int32))])
    a = row.arrays()
    _, eps = model.apply({"params": params}, *(a[k][None] for k in ("tokens", "segment_ids", "positions", "image_ids")),
                         a["latents"][None], np.full((1, layout.max_images), 300, np.int32))
    eps_of.append(np.asarray(eps[0, 0]))
  np.testing.assert_array_equal(*eps_of)

  # With a cache: garbage keys in later slots (same document, text) do not reach the image block.
  cfg = model.cfg.transformer
  clean = transformer.KVCache.empty(cfg, 1, 40)
  rng = np.random.default_rng(1)
  garbage = transformer.KVCache(keys=clean.keys.at[:, :, 20:].set(rng.standard_normal((2, 1, 20, 4, 8))),
                                values=clean.values.at[:, :, 20:].set(rng.standard_normal((2, 1, 20, 4, 8))),
                                segment_ids=clean.segment_ids.at[:, 20:].set(1), image_ids=clean.image_ids)
  slots = np.arange(2, 2 + N)[None]
  block = (np.zeros((1, N), np.int32), np.ones((1, N), np.int32), slots, np.ones((1, N), np.int32),
           latents[None, None], np.full((1, 1), 300, np.int32))
  eps_clean, eps_garbage = (model.apply({"params": params}, *block, cache, slots, with_logits=False)[1]
                            for cache in (clean, garbage))
  np.testing.assert_array_equal(eps_clean, eps_garbage)
  # ... while garbage inside the causal past does change it (the check above can fail).
  early = garbage.replace(segment_ids=garbage.segment_ids.at[:, 0].set(1),
                          keys=garbage.keys.at[:, :, 0].set(5.0))
  assert np.abs(model.apply({"params": params}, *block, early, slots, with_logits=False)[1] - eps_clean).max() > 1e-4


def test_sharded_decoding_equals_one_device(model_and_params):
  model, params = model_and_params
  mesh = sharding.make_mesh(dict(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2,
                                 dcn_data_parallelism=1, dcn_fsdp_parallelism=1, dcn_tensor_parallelism=1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *(np.zeros((1, 24), np.int32),) * 4,
                                              np.zeros((1, 1, *LATENT), np.float32), np.zeros((1, 1), np.int32)))
    shardings = sharding.logical_shardings(mesh, boxed["params"])
  sharded = jax.device_put(params, shardings)
  assert sharded["transformer"]["layers"]["mlp"]["up"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")
  options = dataclasses.replace(OPTS, cfg_scale=3.0, temperature=1.0, max_new_tokens=6)
  prompts = [text_prompt(10, 11), text_prompt(20, boi=True), text_prompt(30)]
  one = decode(model_and_params, prompts, decoding.INTERLEAVED, options)
  on_mesh = decoding.decode(model, sharded, prompts, decoding.INTERLEAVED, SPECIAL, AB, options, jax.random.key(0))
  assert_same(one, on_mesh)


def test_generation_mesh_of_a_tensor_parallelism():
  config = tiny_model_config()                 # 4 heads; the run's mesh is data parallel over all devices
  assert dict(sampler_lib.generation_mesh(config).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sampler_lib.generation_mesh(config, 4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  for bad in (0, 3, 8):
    with pytest.raises(ValueError, match=f"tensor_parallelism = {bad} must divide the 8 devices and the model's 4 "):
      sampler_lib.generation_mesh(config, bad)


@contextlib.contextmanager
def counting_compilations():
  """Yields a Counter of the XLA compilations (persistent-cache hits included) by name, e.g. "jit(text_phase)"."""
  counts = collections.Counter()

  def listener(event, duration, fun_name="", **kwargs):
    counts[fun_name] += event == "/jax/core/compile/backend_compile_duration"
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("data, tensor", [(2, 4), (1, 2)])
def test_tensor_parallel_decoding_equals_one_device(model_and_params, monkeypatch, data, tensor):
  """Params laid out as a checkpoint restores them on a data x tensor mesh: kernels and the KV cache split by heads,
  the same greedy text and guided images as on one device, and one compilation of the text phase."""
  model, params = model_and_params
  config = tiny_model_config()
  mesh = sampler_lib.generation_mesh(config, tensor) if data * tensor == jax.device_count() else sharding.make_mesh(
      dict(ici_data_parallelism=data, ici_fsdp_parallelism=1, ici_tensor_parallelism=tensor, dcn_data_parallelism=1,
           dcn_fsdp_parallelism=1, dcn_tensor_parallelism=1), jax.devices()[:data * tensor])
  targets = sampler_lib.abstract_params(spec_lib.resolve(config), VOCAB, mesh)
  sharded = jax.device_put(params, jax.tree.map(lambda a: a.sharding, targets))
  layers = sharded["transformer"]["layers"]
  assert layers["attention"]["query"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
  assert layers["attention"]["out"]["kernel"].sharding.spec == jax.P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["down"]["kernel"].sharding.spec == jax.P(None, "tensor", "fsdp")
  assert layers["attention"]["key"]["kernel"].addressable_shards[0].data.shape == (2, 32, 4 // tensor, 8)

  text_phase, cache_shards = decoding._jit_text_phase, []

  def recording(model, params, state, *args):
    cache_shards.append(tuple(c.keys.sharding.shard_shape(c.keys.shape) for c in (state.memory.cache,
                                                                                  state.partner.cache)))
    return text_phase(model, params, state, *args)
  monkeypatch.setattr(decoding, "_jit_text_phase", recording)
  options = dataclasses.replace(OPTS, cfg_scale=3.0)           # greedy text, guided images
  prompts = [text_prompt(10, 11), text_prompt(20, boi=True), text_prompt(30), text_prompt(31)]
  with counting_compilations() as compiled:
    on_mesh = decoding.decode(model, sharded, prompts, decoding.INTERLEAVED, SPECIAL, AB, options, jax.random.key(0))
  # Three text phases and two image phases, each compiled once: every call gets the state in the same layout.
  assert compiled["jit(text_phase)"] == compiled["jit(image_phase)"] == 1
  # [layers, B, L, H, Dh]: the 4 rows over data, the 4 heads over tensor; the partners' memory holds 16 + 2 slots.
  assert len(cache_shards) == 3 and set(cache_shards) == {((2, 4 // data, 61, 4 // tensor, 8),
                                                           (2, 4 // data, 18, 4 // tensor, 8))}
  one = decode(model_and_params, prompts, decoding.INTERLEAVED, options)
  assert [g.image_positions for g in one] == [[0, 0], [0, 0], [2, 2], [3, 3]]
  assert_same(one, on_mesh, atol=3e-5)


def test_one_compilation_per_shape_not_per_token_or_step(model_and_params):
  options = dataclasses.replace(OPTS, max_new_tokens=5, diffusion_steps=3, temperature=1.0, cfg_scale=1.5)
  decode(model_and_params, [text_prompt(10, 11)], decoding.INTERLEAVED, options)
  sizes = decoding._jit_text_phase._cache_size(), decoding._jit_image_phase._cache_size()
  # Another prompt of the same bucket, other traced options: nothing new to compile.
  decode(model_and_params, [text_prompt(20, 21, 22)], decoding.INTERLEAVED,
         dataclasses.replace(options, temperature=0.5, top_k=3, cfg_scale=2.0), key=1)
  assert (decoding._jit_text_phase._cache_size(), decoding._jit_image_phase._cache_size()) == sizes


def test_sample_tokens_greedy_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 2000)
  opts = lambda t, k, p: decoding.TextOptions(jnp.float32(t), jnp.int32(k), jnp.float32(p))  # noqa: E731
  assert set(np.asarray(decoding.sample_tokens(logits, keys, opts(0.0, 0, 1.0)))) == {0}
  counts = np.bincount(decoding.sample_tokens(logits, keys, opts(1.0, 0, 1.0)), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  assert set(np.asarray(decoding.sample_tokens(logits, keys, opts(1.0, 2, 1.0)))) == {0, 1}
  assert set(np.asarray(decoding.sample_tokens(logits, keys, opts(1.0, 0, 0.7)))) == {0, 1}   # 0.5 + 0.3 >= 0.7
  assert set(np.asarray(decoding.sample_tokens(logits, keys, opts(1.0, 0, 0.5)))) == {0}


@pytest.mark.parametrize("field, value, message", [
    ("sampler", "euler", "sampler 'euler' is unknown"),
    ("diffusion_steps", 0, "diffusion_steps = 0"),
    ("ddim_eta", 2.0, "ddim_eta = 2.0"),
    ("top_p", 0.0, "top_p"),
])
def test_bad_options_are_named(model_and_params, field, value, message):
  with pytest.raises(ValueError, match=message):
    decode(model_and_params, [text_prompt(10, boi=True)], decoding.IMAGE, dataclasses.replace(OPTS, **{field: value}))


def test_bad_prompts_are_named(model_and_params):
  with pytest.raises(ValueError, match="prompt 0 ends with BOI, but this task draws no images"):
    decode(model_and_params, [text_prompt(10, boi=True)], decoding.TEXT)
  with pytest.raises(ValueError, match="prompt 1 must start with a text piece beginning with BOS"):
    decode(model_and_params, [text_prompt(10), [sequence.TextPiece(np.array([10], np.int32))]], decoding.TEXT)
  with pytest.raises(ValueError, match="no prompts"):
    decode(model_and_params, [], decoding.TEXT)
