"""CLIP (Radford et al. 2021) in Flax Linen, loaded from a Hugging Face CLIP checkpoint directory, for CLIP scores.

The model is Hugging Face transformers' CLIPModel: a ViT image tower (patch conv without bias, a class token,
learned positions, pre_layrnorm, pre-LN encoder layers, post_layernorm on the class token) and a causal text
transformer (token + learned position embeddings, pre-LN encoder layers under a causal mask, final_layer_norm,
the hidden state at the EOS token), each followed by a bias-free projection to `projection_dim`. An encoder layer
is x + out_proj(attention(layer_norm1(x))), then x + fc2(act(fc1(layer_norm2(x)))), with biases on q, k, v, out,
fc1, fc2 and act quick_gelu (x sigmoid(1.702 x)) or exact gelu as config.json says. The embeddings Clip returns
are not normalised; a CLIP score is the cosine of an image's and its prompt's embedding (times 100 by convention).

The directory is a Hugging Face CLIP repo's files (e.g. openai/clip-vit-base-patch32, openai/clip-vit-large-patch14):

  config.json         projection_dim, text_config and vision_config (sizes, hidden_act, layer_norm_eps,
                      eos_token_id); keys it lacks take CLIPTextConfig / CLIPVisionConfig's defaults, and a
                      legacy text_config_dict / vision_config_dict overrides text_config / vision_config
  model.safetensors   the CLIPModel state dict in torch layouts (Linear [out, in], Conv2d OIHW), float32 or float16
  tokenizer.json      the fast (Rust `tokenizers`) tokenizer

Get it on a machine with internet and copy it over:

  huggingface-cli download openai/clip-vit-base-patch32 config.json model.safetensors tokenizer.json --local-dir DIR

Images (CLIPImageProcessor's protocol): uint8 [N, H, W, 3] -> resize the shortest side to image_size (bicubic,
long side int(image_size * long / short)) -> round to uint8 -> centre crop image_size x image_size -> / 255 ->
normalise by CLIP_MEAN, CLIP_STD. Images whose shortest side already is image_size are not resampled, so the usual
square input at image_size goes in exactly. The resize is jax.image.resize "bicubic" (Keys a = -0.5, antialiased
when shrinking), which differs slightly (a grey level or so) from the PIL bicubic Hugging Face uses.

Texts: tokenizer.json encodes each text with its post-processor's <|startoftext|> ... <|endoftext|>, truncated to
the text tower's max_position_embeddings T (77 for OpenAI's CLIPs, the EOS kept last) and padded to T with the
<|endoftext|> id, as CLIPTokenizer(padding="max_length", truncation=True). The text tower is causal, so whatever
follows the pooled EOS (padding or truncated text) does not change the embedding. Pooling (pooling_index): at the
first eos_token_id of text_config; configs with the legacy eos_token_id 2 (OpenAI's own) pool at the argmax of the
ids, where CLIP's <|endoftext|> sits as the largest id of its vocabulary (transformers keeps this for them).

Parameter names mirror the torch names without the "embeddings." and "encoder." levels, the encoder layers
stacked on a leading `layers` axis (nn.scan): `vision_model.encoder.layers.3.self_attn.q_proj.weight` [D, D] is
row 3 of ('vision_model', 'layers', 'self_attn', 'q_proj', 'kernel') [L, D, heads, head_dim]; out_proj's kernel
is [L, heads, head_dim, D]; fc1 / fc2 and the projections are [in, out]; the patch kernel is HWIO;
LayerNorm weight is `scale`; embedding tables keep their shapes.
"""
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from tfusion.models import torch_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
# CLIPImageProcessor's (OpenAI's) normalisation of [0, 1] RGB.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EOS_TOKEN = "<|endoftext|>"
LEGACY_EOS_TOKEN_ID = 2           # configs saved before transformers PR #24773: pool at the argmax of the ids
# float32 matmuls at full precision on every backend (TPUs otherwise round operands to bfloat16).
PRECISION = jax.lax.Precision.HIGHEST
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (openai/clip-vit-base-patch32).
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 49407}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5}
PROJECTION_DIM_DEFAULT = 512
LOGIT_SCALE_INIT = 2.6592         # log(1 / 0.07)

ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower's sizes."""
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """The sizes config.json gives (hashable: a static argument of the jitted forwards)."""
  vision: TowerConfig
  text: TowerConfig
  image_size: int
  patch_size: int
  vocab_size: int
  max_positions: int            # text_config.max_position_embeddings: the token length T
  eos_token_id: int
  projection_dim: int

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def config_from_dict(config: Mapping) -> ClipConfig:
  """ClipConfig from a CLIPModel config.json dict; ValueError for what this module cannot run."""
  def merged(name, defaults):
    sub = dict(defaults)
    for key in (f"{name}_config", f"{name}_config_dict"):
      if isinstance(config.get(key), Mapping):
        sub.update({k: v for k, v in config[key].items() if v is not None})
    return sub

  text, vision = merged("text", TEXT_DEFAULTS), merged("vision", VISION_DEFAULTS)

  def tower(sub, name):
    if sub["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"CLIP config {name}_config.hidden_act {sub['hidden_act']!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if sub["hidden_size"] % sub["num_attention_heads"]:
      raise ValueError(f"CLIP config {name}_config: hidden_size {sub['hidden_size']} is not divisible by "
                       f"num_attention_heads {sub['num_attention_heads']}")
    return TowerConfig(int(sub["hidden_size"]), int(sub["num_hidden_layers"]), int(sub["num_attention_heads"]),
                       int(sub["intermediate_size"]), sub["hidden_act"], float(sub["layer_norm_eps"]))

  if vision["num_channels"] != 3:
    raise ValueError(f"CLIP config vision_config.num_channels is {vision['num_channels']}; only RGB (3) is supported")
  return ClipConfig(vision=tower(vision, "vision"), text=tower(text, "text"), image_size=int(vision["image_size"]),
                    patch_size=int(vision["patch_size"]), vocab_size=int(text["vocab_size"]),
                    max_positions=int(text["max_position_embeddings"]), eos_token_id=int(text["eos_token_id"]),
                    projection_dim=int(config.get("projection_dim") or PROJECTION_DIM_DEFAULT))


# ----------------------------------------------------------------------------------------------------------- model

def _normal(std=0.02):
  return nn.initializers.normal(std)


class Linear(nn.Module):
  """einsum(spec, x, kernel) (+ bias), float32 at full precision; kernel and bias shapes / logical axes given."""
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...] | None = None    # the kernel's trailing (output) axes; None: no bias

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(_normal(), self.kernel_axes), self.kernel_shape,
                        jnp.float32)
    y = jnp.einsum(self.spec, x, kernel, precision=PRECISION)
    if self.bias_axes is not None:
      shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_axes):]
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes), shape,
                         jnp.float32)
    return y


def _layer_norm(eps, name):
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class Attention(nn.Module):
  """Multi-head self-attention with biases, optionally causal.  x: [B, L, D] -> [B, L, D]."""
  cfg: TowerConfig
  causal: bool

  @nn.compact
  def __call__(self, x):
    d, h, k = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.head_dim
    q, key, v = (Linear("bld,dhk->blhk", (d, h, k), ("embed", "heads", "kv"), ("heads", "kv"), name=name)(x)
                 for name in ("q_proj", "k_proj", "v_proj"))
    logits = jnp.einsum("bqhk,bshk->bhqs", q, key, precision=PRECISION) * k ** -0.5
    if self.causal:
      length = x.shape[1]
      allowed = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
      logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v, precision=PRECISION)
    return Linear("blhk,hkd->bld", (h, k, d), ("heads", "kv", "embed"), ("embed",), name="out_proj")(out)


class Mlp(nn.Module):
  """fc2(act(fc1(x))).  x: [B, L, D] -> [B, L, D]."""
  cfg: TowerConfig

  @nn.compact
  def __call__(self, x):
    d, m = self.cfg.hidden_size, self.cfg.intermediate_size
    x = Linear("bld,dm->blm", (d, m), ("embed", "mlp"), ("mlp",), name="fc1")(x)
    x = ACTIVATIONS[self.cfg.hidden_act](x)
    return Linear("blm,md->bld", (m, d), ("mlp", "embed"), ("embed",), name="fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-LN residual layer; fits nn.scan: x [B, L, D] -> (x [B, L, D], None)."""
  cfg: TowerConfig
  causal: bool

  @nn.compact
  def __call__(self, x, _=None):
    x = x + Attention(self.cfg, self.causal, name="self_attn")(_layer_norm(self.cfg.layer_norm_eps, "layer_norm1")(x))
    x = x + Mlp(self.cfg, name="mlp")(_layer_norm(self.cfg.layer_norm_eps, "layer_norm2")(x))
    return x, None


def _encoder(cfg: TowerConfig, causal: bool):
  """cfg.num_layers EncoderLayers scanned over a leading `layers` param axis, as module 'layers'."""
  scanned = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, causal, name="layers")


class VisionTower(nn.Module):
  """ViT.  pixels: [B, S, S, 3] normalised, S = image_size -> post_layernorm(class token) [B, D]."""
  config: ClipConfig

  @nn.compact
  def __call__(self, pixels):
    c, cfg = self.config, self.config.vision
    p, d, g = c.patch_size, cfg.hidden_size, c.image_size // c.patch_size
    if pixels.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"CLIP vision tower needs [B, {c.image_size}, {c.image_size}, 3] pixels, got {pixels.shape}")
    kernel = self.param("patch_embedding", nn.with_logical_partitioning(
        _normal(), ("conv_height", "conv_width", "patch", "embed")), (p, p, 3, d), jnp.float32)
    patches = pixels[:, :g * p, :g * p].reshape(-1, g, p, g, p, 3)            # a stride-p conv, no bias
    x = jnp.einsum("bypxqc,pqcd->byxd", patches, kernel, precision=PRECISION).reshape(-1, g * g, d)
    cls = self.param("class_embedding", nn.with_logical_partitioning(_normal(), ("embed",)), (d,), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
    x = x + self.param("position_embedding", nn.with_logical_partitioning(_normal(), ("length", "embed")),
                       (g * g + 1, d), jnp.float32)
    x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm")(x)
    x, _ = _encoder(cfg, causal=False)(x)
    return _layer_norm(cfg.layer_norm_eps, "post_layernorm")(x[:, 0])


def pooling_index(ids, eos_token_id: int):
  """The position the text tower pools.  ids: [B, T] int -> [B]: the first eos_token_id in each row; for the
  legacy eos_token_id 2 the first position of the row's largest id (CLIP's <|endoftext|> is its largest id)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class TextTower(nn.Module):
  """Causal transformer.  ids: [B, T] int, T <= max_positions -> final_layer_norm(x) at pooling_index [B, D]."""
  config: ClipConfig

  @nn.compact
  def __call__(self, ids):
    c, cfg = self.config, self.config.text
    d, length = cfg.hidden_size, ids.shape[1]
    if length > c.max_positions:
      raise ValueError(f"CLIP text tower takes at most {c.max_positions} tokens, got {length}")
    tokens = self.param("token_embedding", nn.with_logical_partitioning(_normal(), ("vocab", "embed")),
                        (c.vocab_size, d), jnp.float32)
    positions = self.param("position_embedding", nn.with_logical_partitioning(_normal(), ("length", "embed")),
                           (c.max_positions, d), jnp.float32)
    x = jnp.take(tokens, ids, axis=0) + positions[:length]
    x, _ = _encoder(cfg, causal=True)(x)
    x = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
    return jnp.take_along_axis(x, pooling_index(ids, c.eos_token_id)[:, None, None], axis=1)[:, 0]


class ClipModel(nn.Module):
  """CLIPModel's towers and projections. __call__(pixels, ids) -> (image [B, P], text [B', P]) embeddings, not
  normalised; embed_images / embed_texts run one tower (apply(..., method=...))."""
  config: ClipConfig

  def setup(self):
    c = self.config
    self.vision_model = VisionTower(c)
    self.text_model = TextTower(c)
    # "projection" is in no sharding rule, so that axis stays whole (flax leaves unknown logical names unsharded).
    self.visual_projection = Linear("bd,dp->bp", (c.vision.hidden_size, c.projection_dim), ("embed", "projection"))
    self.text_projection = Linear("bd,dp->bp", (c.text.hidden_size, c.projection_dim), ("embed", "projection"))
    self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(LOGIT_SCALE_INIT), ()), (), jnp.float32)

  def embed_images(self, pixels):
    """pixels: [B, S, S, 3] preprocessed (preprocess_images) -> [B, projection_dim]."""
    return self.visual_projection(self.vision_model(pixels))

  def embed_texts(self, ids):
    """ids: [B, T] int -> [B, projection_dim]."""
    return self.text_projection(self.text_model(ids))

  def __call__(self, pixels, ids):
    return self.embed_images(pixels), self.embed_texts(ids)


# --------------------------------------------------------------------------------------------- pre-processing

def preprocess_images(images, image_size: int):
  """CLIPImageProcessor's pipeline (module docstring).  images: uint8 [N, H, W, 3] -> float32 [N, s, s, 3]."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  short = min(h, w)
  if short != image_size:
    size = (image_size, int(image_size * w / h)) if h <= w else (int(image_size * h / w), image_size)
    x = jax.image.resize(x, (x.shape[0], *size, 3), "bicubic")
    x = jnp.clip(jnp.round(x), 0, 255)                # PIL resizes uint8 images to uint8
    h, w = size
  top, left = (h - image_size) // 2, (w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  return (x / 255.0 - jnp.array(CLIP_MEAN, jnp.float32)) / jnp.array(CLIP_STD, jnp.float32)


def _pad_id(tokenizer: tokenizers.Tokenizer, config: ClipConfig) -> int:
  """The <|endoftext|> id (CLIPTokenizer's pad token); without one, eos_token_id (or 0 for a legacy config)."""
  eos = tokenizer.token_to_id(EOS_TOKEN)
  if eos is not None:
    return eos
  return 0 if config.eos_token_id == LEGACY_EOS_TOKEN_ID else config.eos_token_id


def tokenize(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], config: ClipConfig) -> np.ndarray:
  """int32 ids [N, T] (T = config.max_positions): each text encoded with the tokenizer's special tokens,
  truncated to T (sets the tokenizer's truncation; its own padding is turned off) and padded with _pad_id.
  ValueError for an id outside the vocabulary, or a row without eos_token_id (unless the config is legacy)."""
  if isinstance(texts, str):
    raise TypeError("tokenize takes a list of texts, not one string")
  length = config.max_positions
  if (tokenizer.truncation or {}).get("max_length") != length:
    tokenizer.enable_truncation(length)
  if tokenizer.padding is not None:
    tokenizer.no_padding()
  ids = np.full((len(texts), length), _pad_id(tokenizer, config), np.int32)
  for i, encoding in enumerate(tokenizer.encode_batch(list(texts))):
    ids[i, :len(encoding.ids)] = encoding.ids
    if config.eos_token_id != LEGACY_EOS_TOKEN_ID and config.eos_token_id not in encoding.ids:
      raise ValueError(f"text {i} ({texts[i][:40]!r}) has no eos_token_id {config.eos_token_id} after tokenizing: "
                       "the tokenizer's post-processor must add it")
  if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
    raise ValueError(f"token ids outside the CLIP vocabulary [0, {config.vocab_size}): "
                     f"tokenizer.json does not match config.json")
  return ids


# --------------------------------------------------------------------------------------------------- inference

@functools.partial(jax.jit, static_argnames="config")
def _embed_images(params, images, config: ClipConfig):
  pixels = preprocess_images(images, config.image_size)
  return ClipModel(config).apply({"params": params}, pixels, method=ClipModel.embed_images)


@functools.partial(jax.jit, static_argnames="config")
def _embed_ids(params, ids, config: ClipConfig):
  return ClipModel(config).apply({"params": params}, ids, method=ClipModel.embed_texts)


def _batched(fn, inputs: np.ndarray, batch_size: int, width: int) -> np.ndarray:
  """fn over rows in batches of min(batch_size, N) (one compiled shape), the last padded with zeros and trimmed."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(inputs)
  if n == 0:
    return np.zeros((0, width), np.float32)
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    chunk = inputs[start:start + size]
    if len(chunk) < size:
      chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(fn(chunk))[:n - start])
  return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """A loaded CLIP: params (the ClipModel tree), config, and the tokenizer of tokenizer.json."""
  params: dict
  config: ClipConfig
  tokenizer: tokenizers.Tokenizer

  def embed_images(self, images_uint8: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 [N, H, W, 3] (preprocessed as the module docstring says) -> float32 [N, projection_dim]."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"embed_images needs uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    fn = functools.partial(_embed_images, self.params, config=self.config)
    return _batched(fn, images, batch_size, self.config.projection_dim)

  def embed_token_ids(self, ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int [N, T] token ids (T <= max_positions) -> float32 [N, projection_dim]."""
    fn = functools.partial(_embed_ids, self.params, config=self.config)
    return _batched(fn, np.asarray(ids, np.int32), batch_size, self.config.projection_dim)

  def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """texts -> float32 [N, projection_dim] (tokenized by `tokenize`)."""
    return self.embed_token_ids(tokenize(self.tokenizer, texts, self.config), batch_size)


# ------------------------------------------------------------------------------------------------ weight files

# Per encoder layer: (torch suffix, flax path under 'layers', conversion). Conversions (torch -> flax per layer):
# copy; linear [out, in] -> [in, out]; heads_in [D, D] -> [D, H, Dh]; heads_bias [D] -> [H, Dh];
# heads_out [D, D] -> [H, Dh, D].
_LAYER_PARAMS = (
    [(f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), "heads_in") for p in "qkv"]
    + [(f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias"), "heads_bias") for p in "qkv"]
    + [("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), "heads_out"),
       ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), "copy")]
    + [(f"{n}.{w}", (n, f), "copy") for n in ("layer_norm1", "layer_norm2") for w, f in (("weight", "scale"),
                                                                                         ("bias", "bias"))]
    + [(f"mlp.{fc}.weight", ("mlp", fc, "kernel"), "linear") for fc in ("fc1", "fc2")]
    + [(f"mlp.{fc}.bias", ("mlp", fc, "bias"), "copy") for fc in ("fc1", "fc2")])
_IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _to_flax(value: np.ndarray, kind: str, cfg: TowerConfig) -> np.ndarray:
  h, k = cfg.num_heads, cfg.head_dim
  if kind == "linear":
    return value.T
  if kind == "heads_in":
    return value.T.reshape(-1, h, k)
  if kind == "heads_bias":
    return value.reshape(h, k)
  if kind == "heads_out":
    return value.T.reshape(h, k, -1)
  return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return value.T
  if kind == "heads_in":
    return value.reshape(value.shape[0], -1).T
  if kind == "heads_bias":
    return value.reshape(-1)
  if kind == "heads_out":
    return value.reshape(-1, value.shape[-1]).T
  return value


def _layer_shapes(cfg: TowerConfig) -> dict[str, tuple[int, ...]]:
  d, m = cfg.hidden_size, cfg.intermediate_size
  shapes = {f"self_attn.{p}_proj.{w}": (d, d) if w == "weight" else (d,) for p in ("q", "k", "v", "out")
            for w in ("weight", "bias")}
  shapes.update({f"{n}.{w}": (d,) for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")})
  shapes.update({"mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)})
  return shapes


def _top_params(c: ClipConfig) -> list[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
  """(torch name, flax path, conversion, torch shape) of every non-layer tensor. The patch conv kernel arrives
  HWIO from torch_weights.params_from_torch, so it is a copy here."""
  v, t, p = c.vision.hidden_size, c.text.hidden_size, c.patch_size
  rows = [("vision_model.embeddings.class_embedding", ("vision_model", "class_embedding"), "copy", (v,)),
          ("vision_model.embeddings.patch_embedding.weight", ("vision_model", "patch_embedding"), "copy", (v, 3, p, p)),
          ("vision_model.embeddings.position_embedding.weight", ("vision_model", "position_embedding"), "copy",
           (c.num_patches + 1, v)),
          ("text_model.embeddings.token_embedding.weight", ("text_model", "token_embedding"), "copy",
           (c.vocab_size, t)),
          ("text_model.embeddings.position_embedding.weight", ("text_model", "position_embedding"), "copy",
           (c.max_positions, t)),
          ("visual_projection.weight", ("visual_projection", "kernel"), "linear", (c.projection_dim, v)),
          ("text_projection.weight", ("text_projection", "kernel"), "linear", (c.projection_dim, t)),
          ("logit_scale", ("logit_scale",), "copy", ())]
  for tower, norm, size in (("vision_model", "pre_layrnorm", v), ("vision_model", "post_layernorm", v),
                            ("text_model", "final_layer_norm", t)):
    rows += [(f"{tower}.{norm}.weight", (tower, norm, "scale"), "copy", (size,)),
             (f"{tower}.{norm}.bias", (tower, norm, "bias"), "copy", (size,))]
  return rows


def _towers(c: ClipConfig):
  return (("vision_model", c.vision), ("text_model", c.text))


def torch_layout(c: ClipConfig) -> torch_weights.Layout:
  """{torch name: ((torch name,), torch shape)} of every tensor in a CLIPModel model.safetensors."""
  layout = {name: ((name,), shape) for name, _, _, shape in _top_params(c)}
  for tower, cfg in _towers(c):
    for i in range(cfg.num_layers):
      for suffix, shape in _layer_shapes(cfg).items():
        name = f"{tower}.encoder.layers.{i}.{suffix}"
        layout[name] = ((name,), shape)
  return layout


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return np.asarray(tree, np.float32)


def params_from_tensors(tensors: Mapping[str, np.ndarray], c: ClipConfig, path: str = "<tensors>") -> dict:
  """ClipModel params (float32 numpy) from a CLIPModel state dict (torch names and layouts). position_ids buffers
  are ignored; any other missing, unexpected or mis-shaped key is a ValueError naming it."""
  tensors = {name: value for name, value in tensors.items() if name not in _IGNORED}
  flat = torch_weights.params_from_torch(tensors, torch_layout(c), "CLIP", path)   # float32, conv OIHW -> HWIO
  params: dict = {}
  for name, key, kind, _ in _top_params(c):
    _set(params, key, _to_flax(flat[name], kind, c.vision))
  for tower, cfg in _towers(c):
    for suffix, key, kind in _LAYER_PARAMS:
      stacked = [_to_flax(flat[f"{tower}.encoder.layers.{i}.{suffix}"], kind, cfg) for i in range(cfg.num_layers)]
      _set(params, (tower, "layers", *key), np.stack(stacked))
  return params


def tensors_from_params(params, c: ClipConfig) -> dict[str, np.ndarray]:
  """The CLIPModel state dict (torch names and layouts, float32, contiguous) of ClipModel params."""
  params = nn.meta.unbox(params)
  tensors = {}
  for name, key, kind, _ in _top_params(c):
    value = _to_torch(_get(params, key), kind)
    tensors[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value          # HWIO -> OIHW
  for tower, cfg in _towers(c):
    for suffix, key, kind in _LAYER_PARAMS:
      stacked = _get(params, (tower, "layers", *key))
      for i in range(cfg.num_layers):
        tensors[f"{tower}.encoder.layers.{i}.{suffix}"] = _to_torch(stacked[i], kind)
  return {name: np.ascontiguousarray(value).reshape(value.shape) for name, value in tensors.items()}


def _require(directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP directory {directory} has no {name} ({path})")
  return path


def load_clip(directory: str) -> Clip:
  """Clip from a Hugging Face CLIP directory (config.json, model.safetensors, tokenizer.json).

  FileNotFoundError names a missing file; ValueError names missing, unexpected or mis-shaped weights.
  """
  config_path, weights_path, tokenizer_path = (_require(directory, name)
                                               for name in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME))
  with open(config_path) as f:
    config = config_from_dict(json.load(f))
  params = params_from_tensors(torch_weights.read_tensors(weights_path, "CLIP"), config, weights_path)
  tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
  if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
    raise ValueError(f"{tokenizer_path} has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, more than "
                     f"config.json's text vocab_size {config.vocab_size}")
  tokenizer.no_padding()
  tokenizer.enable_truncation(config.max_positions)
  return Clip(params=jax.device_put(params), config=config, tokenizer=tokenizer)


def save_clip(directory: str, params, config_dict: Mapping, tokenizer: "str | tokenizers.Tokenizer") -> None:
  """Write params as a Hugging Face CLIP directory: config.json (config_dict as given), model.safetensors (the
  CLIPModel state dict, float32), tokenizer.json (copied from a path, or saved from a Tokenizer)."""
  config = config_from_dict(config_dict)
  tensors = tensors_from_params(params, config)
  # Written directly, not by torch_weights.save_torch: its np.ascontiguousarray makes the 0-d logit_scale [1].
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(dict(config_dict), f, indent=2)
  if isinstance(tokenizer, tokenizers.Tokenizer):
    tokenizer.save(os.path.join(directory, TOKENIZER_NAME))
  else:
    with open(tokenizer) as f:
      text = f.read()
    with open(os.path.join(directory, TOKENIZER_NAME), "w") as f:
      f.write(text)
