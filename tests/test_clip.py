"""CLIP: a tiny random Hugging Face-layout checkpoint (written by save_clip, with a BPE tokenizer.json trained here)
loads bit for bit and embeds images and texts as a float64 NumPy reference of CLIPModel written from the torch
names; the causal text tower and the CLIP_EOS pooling rules; strict loading; batching; pre-processing."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.special
from flax import traverse_util

from tfusion.evaluation import clip
from tests.helpers import (CLIP_EOS, CLIP_MAX_POSITIONS, CLIP_SENTENCES, CLIP_TOKENIZER, clip_config_dict,
                           make_clip_tokenizer, random_clip_params)

TEXTS = ["a photo of a red cat", "two dogs on the sofa", "an apple"]
# CLIPImageProcessor's constants, written out here.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
def images(seed, n=3, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ float64 reference

def ref_layer_norm(x, t, name, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]


def ref_act(name, x):
  if name == "quick_gelu":
    return x * scipy.special.expit(1.702 * x)
  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def ref_linear(x, t, name, bias=True):
  y = x @ t[f"{name}.weight"].T                                   # torch Linear: weight [out, in]
  return y + t[f"{name}.bias"] if bias else y


def ref_encoder(x, t, tower, sub, causal):
  heads, eps = sub["num_attention_heads"], sub["layer_norm_eps"]
  b, length, d = x.shape
  dh = d // heads
  for i in range(sub["num_hidden_layers"]):
    p = f"{tower}.encoder.layers.{i}"
    h = ref_layer_norm(x, t, f"{p}.layer_norm1", eps)
    q, k, v = (ref_linear(h, t, f"{p}.self_attn.{n}_proj").reshape(b, length, heads, dh).transpose(0, 2, 1, 3)
               for n in "qkv")
    logits = q @ k.transpose(0, 1, 3, 2) * dh ** -0.5
    if causal:
      logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
    x = x + ref_linear(out, t, f"{p}.self_attn.out_proj")
    h = ref_layer_norm(x, t, f"{p}.layer_norm2", eps)
    x = x + ref_linear(ref_act(sub["hidden_act"], ref_linear(h, t, f"{p}.mlp.fc1")), t, f"{p}.mlp.fc2")
  return x


def ref_images(tensors, cfg, imgs):
  """CLIPModel.get_image_features of uint8 [N, S, S, 3] images at S = image_size, float64."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  sub = cfg["vision_config"]
  p, eps = sub["patch_size"], sub["layer_norm_eps"]
  pixels = (imgs.astype(np.float64) / 255 - MEAN) / STD
  n, s = len(imgs), sub["image_size"]
  g = s // p
  conv = t["vision_model.embeddings.patch_embedding.weight"]        # OIHW
  patches = pixels.reshape(n, g, p, g, p, 3)
  x = np.einsum("bhuwvc,dcuv->bhwd", patches, conv).reshape(n, g * g, -1)
  cls = np.broadcast_to(t["vision_model.embeddings.class_embedding"], (n, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + t["vision_model.embeddings.position_embedding.weight"]
  x = ref_layer_norm(x, t, "vision_model.pre_layrnorm", eps)
  x = ref_encoder(x, t, "vision_model", sub, causal=False)
  pooled = ref_layer_norm(x[:, 0], t, "vision_model.post_layernorm", eps)
  return ref_linear(pooled, t, "visual_projection", bias=False)


def ref_texts(tensors, cfg, texts):
  """CLIPModel.get_text_features of texts tokenized by a fresh tokenizer (no truncation needed), padded with
  <|endoftext|> to max_position_embeddings, pooled at the first <|endoftext|>, float64."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  sub = cfg["text_config"]
  length = sub["max_position_embeddings"]
  ids = np.full((len(texts), length), CLIP_EOS)
  for i, text in enumerate(texts):
    enc = make_clip_tokenizer().encode(text).ids
    assert len(enc) <= length and enc[-1] == CLIP_EOS
    ids[i, :len(enc)] = enc
  x = t["text_model.embeddings.token_embedding.weight"][ids] + t["text_model.embeddings.position_embedding.weight"]
  x = ref_encoder(x, t, "text_model", sub, causal=True)
  x = ref_layer_norm(x, t, "text_model.final_layer_norm", sub["layer_norm_eps"])
  pooled = x[np.arange(len(texts)), np.argmax(ids == CLIP_EOS, axis=1)]
  return ref_linear(pooled, t, "text_projection", bias=False)


def assert_close(got, want):
  """float32 forward vs float64: embeddings are O(1); measured errors are ~1e-6."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def checkpoint(request, tmp_path_factory):
  """(directory, config dict, params saved, loaded Clip)."""
  cfg = clip_config_dict(request.param)
  params = random_clip_params(clip.config_from_dict(cfg))
  directory = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
  clip.save_clip(directory, params, cfg, CLIP_TOKENIZER)
  return directory, cfg, params, clip.load_clip(directory)


def test_load_is_bit_exact_and_matches_reference(checkpoint):
  directory, cfg, params, model = checkpoint
  assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert model.config.vision.hidden_act == model.config.text.hidden_act == cfg["text_config"]["hidden_act"]
  assert model.config.projection_dim == 16 and model.config.eos_token_id == CLIP_EOS
  got_flat, want_flat = (traverse_util.flatten_dict(jax.tree.map(np.asarray, p)) for p in (model.params, params))
  assert got_flat.keys() == want_flat.keys()
  for key, value in want_flat.items():
    assert got_flat[key].dtype == np.float32 and got_flat[key].shape == value.shape, key
    np.testing.assert_array_equal(got_flat[key], value, err_msg=str(key))
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  assert tensors["logit_scale"].shape == () and tensors["vision_model.embeddings.patch_embedding.weight"].shape == (
      32, 3, 8, 8)
  assert tensors["visual_projection.weight"].shape == (16, 32) and tensors["text_projection.weight"].shape == (16, 24)

  imgs = images(1)
  got = model.embed_images(imgs)
  assert got.shape == (3, 16) and got.dtype == np.float32
  assert_close(got, ref_images(tensors, cfg, imgs))
  got = model.embed_texts(TEXTS)
  assert got.shape == (3, 16) and got.dtype == np.float32
  assert_close(got, ref_texts(tensors, cfg, TEXTS))


def test_transposed_linear_weight_fails_the_reference(checkpoint):
  directory, cfg, _, model = checkpoint
  tensors = safetensors.numpy.load_file(os.path.join(directory, "model.safetensors"))
  imgs = images(1)
  got = model.embed_images(imgs)
  for name in ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.1.mlp.fc1.weight"):
    bad = dict(tensors)
    if bad[name].shape[0] == bad[name].shape[1]:
      bad[name] = bad[name].T
    else:                                        # [out, in] read as [in, out], then back to the shape torch wants
      bad[name] = np.ascontiguousarray(bad[name].reshape(bad[name].shape[::-1]).T)
    assert np.abs(got - ref_images(bad, cfg, imgs)).max() > 1e-2, name


def test_text_tower_is_causal(checkpoint):
  _, _, _, model = checkpoint
  ids = clip.tokenize(model.tokenizer, ["a photo of a cat"], model.config)
  eos_at = int(np.argmax(ids[0] == CLIP_EOS))
  assert ids[0, eos_at + 1:].tolist() == [CLIP_EOS] * (CLIP_MAX_POSITIONS - eos_at - 1)   # padded with <|endoftext|>
  after = ids.copy()
  after[0, eos_at + 1:] = np.arange(CLIP_MAX_POSITIONS - eos_at - 1) % 5 + 3            # other tokens after the EOS
  before = ids.copy()
  before[0, eos_at - 1] = (before[0, eos_at - 1] + 1) % CLIP_EOS                         # a token before it
  base, changed_after, changed_before = (model.embed_token_ids(x)[0] for x in (ids, after, before))
  np.testing.assert_allclose(changed_after, base, rtol=0, atol=1e-6)
  assert np.abs(changed_before - base).max() > 1e-3


def test_pooling_index_rules():
  ids = np.array([[49406, 320, 49407, 49407, 0], [49406, 49407, 7, 49407, 3]])
  np.testing.assert_array_equal(clip.pooling_index(ids, 49407), [2, 1])             # first eos_token_id
  np.testing.assert_array_equal(clip.pooling_index(ids, 7), [0, 2])                 # any id: first occurrence
  np.testing.assert_array_equal(clip.pooling_index(ids, 2), [2, 1])                 # legacy: first largest id
  legacy = np.array([[5, 9, 3, 9], [1, 2, 8, 0]])
  np.testing.assert_array_equal(clip.pooling_index(legacy, 2), [1, 2])


def test_legacy_eos_config_pools_the_same(checkpoint, tmp_path):
  """eos_token_id 2 (OpenAI's configs) pools at the largest id, here <|endoftext|>: the same embeddings."""
  directory, cfg, _, model = checkpoint
  legacy_cfg = clip_config_dict(cfg["text_config"]["hidden_act"], eos_token_id=2)
  shutil.copytree(directory, tmp_path / "legacy")
  (tmp_path / "legacy" / "config.json").write_text(json.dumps(legacy_cfg))
  legacy = clip.load_clip(str(tmp_path / "legacy"))
  assert legacy.config.eos_token_id == 2
  np.testing.assert_allclose(legacy.embed_texts(TEXTS), model.embed_texts(TEXTS), rtol=0, atol=1e-6)


def test_tokenize_truncates_keeping_eos_and_needs_eos(checkpoint):
  _, _, _, model = checkpoint
  long_text = " ".join(CLIP_SENTENCES)
  ids = clip.tokenize(model.tokenizer, [long_text, "a cat"], model.config)
  assert ids.shape == (2, CLIP_MAX_POSITIONS) and ids.dtype == np.int32
  assert ids[0, 0] == CLIP_TOKENIZER.token_to_id("<|startoftext|>")
  assert ids[0, -1] == CLIP_EOS and CLIP_EOS not in ids[0, :-1]
  no_specials = make_clip_tokenizer()
  no_specials.post_processor = None
  with pytest.raises(ValueError, match="no eos_token_id"):
    clip.tokenize(no_specials, ["a cat"], model.config)


@pytest.fixture
def good_dir(checkpoint, tmp_path):
  directory = tmp_path / "clip"
  shutil.copytree(checkpoint[0], directory)
  return directory


def rewrite_weights(directory, edit):
  path = str(directory / "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def test_position_ids_buffers_are_ignored(good_dir, checkpoint):
  def add(t):
    t["text_model.embeddings.position_ids"] = np.arange(CLIP_MAX_POSITIONS, dtype=np.int64)[None]
    t["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
  rewrite_weights(good_dir, add)
  loaded = clip.load_clip(str(good_dir))
  np.testing.assert_array_equal(loaded.params["text_model"]["token_embedding"],
                                checkpoint[3].params["text_model"]["token_embedding"])


@pytest.mark.parametrize("edit, name", [
    (lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"), "text_model.encoder.layers.1.mlp.fc2.bias"),
    (lambda t: t.update({"vision_model.head.weight": np.zeros((2, 2), np.float32)}), "vision_model.head.weight"),
    (lambda t: t.update({"visual_projection.weight": np.zeros((32, 16), np.float32)}), "visual_projection.weight"),
])
def test_strict_loader_names_the_key(good_dir, edit, name):
  rewrite_weights(good_dir, edit)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    clip.load_clip(str(good_dir))


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json", "model.safetensors"])
def test_missing_file_is_named(good_dir, missing):
  os.remove(good_dir / missing)
  with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
    clip.load_clip(str(good_dir))


def test_batching_pads_and_trims(checkpoint):
  _, _, _, model = checkpoint
  imgs = images(2)
  small, large = model.embed_images(imgs, batch_size=2), model.embed_images(imgs, batch_size=8)
  assert small.shape == large.shape == (3, 16)
  np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-6)
  assert model.embed_images(imgs[:0]).shape == (0, 16) and model.embed_texts([]).shape == (0, 16)


def test_preprocess_crop_and_resize():
  # Shortest side at image_size: no resampling, centre crop of the long side, then CLIP's normalisation.
  wide = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
  got = np.asarray(clip.preprocess_images(wide, 32))
  np.testing.assert_allclose(got, (wide[:, :, 8:40] / 255 - MEAN) / STD, rtol=0, atol=1e-6)
  # Resampled: shape, flat images stay flat, a smooth ramp stays close to the area average.
  flat = np.full((2, 64, 64, 3), 200, np.uint8)
  np.testing.assert_allclose(np.asarray(clip.preprocess_images(flat, 32)), np.broadcast_to((200 / 255 - MEAN) / STD,
                                                                                           (2, 32, 32, 3)), atol=1e-6)
  ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None] * 3, (1, 64, 64, 3))
  out = np.asarray(clip.preprocess_images(ramp, 32))[0, 16, :, 0] * STD[0] + MEAN[0]
  area = (ramp[0, 0, 0::2, 0].astype(float) + ramp[0, 0, 1::2, 0]) / 2 / 255
  assert out.shape == (32,) and np.abs(out - area)[2:-2].max() < 2 / 255
