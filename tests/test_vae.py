"""KL-VAE: shapes, default size, diffusers import against a NumPy reference written from the diffusers
architecture, conversion round trips and errors, a tiny overfit, logical axis names on every parameter."""
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import traverse_util
from jax.sharding import PartitionSpec

from tfusion.models import vae
from tests.helpers import logically_partitioned_params

# A diffusers config.json for a tiny AutoencoderKL (f = 2), with keys that do not shape the weights.
TINY_JSON = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "in_channels": 3, "out_channels": 3,
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "block_out_channels": [8, 16], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
             "norm_num_groups": 4, "sample_size": 16, "scaling_factor": 0.18215, "force_upcast": True}
TINY = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
DEFAULT_PARAMS = 83_709_419


def diffusers_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """Names and torch-layout shapes of a diffusers AutoencoderKL state dict, following the diffusers constructors
  (Encoder, Decoder, DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D, ResnetBlock2D, Attention)."""
  shapes = {}

  def conv(name, cin, cout, k=3):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

  def resnet(name, cin, cout):
    norm(f"{name}.norm1", cin)
    conv(f"{name}.conv1", cin, cout)
    norm(f"{name}.norm2", cout)
    conv(f"{name}.conv2", cout, cout)
    if cin != cout:
      conv(f"{name}.conv_shortcut", cin, cout, 1)

  def mid(name, c):
    resnet(f"{name}.resnets.0", c, c)
    norm(f"{name}.attentions.0.group_norm", c)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
      shapes[f"{name}.attentions.0.{proj}.weight"], shapes[f"{name}.attentions.0.{proj}.bias"] = (c, c), (c,)
    resnet(f"{name}.resnets.1", c, c)

  widths, layers, latent = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
  conv("encoder.conv_in", cfg["in_channels"], widths[0])
  out = widths[0]
  for i, width in enumerate(widths):
    cin, out = out, width
    for j in range(layers):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else out, out)
    if i < len(widths) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out)
  mid("encoder.mid_block", widths[-1])
  norm("encoder.conv_norm_out", widths[-1])
  conv("encoder.conv_out", widths[-1], 2 * latent)
  conv("decoder.conv_in", latent, widths[-1])
  mid("decoder.mid_block", widths[-1])
  out = widths[-1]
  for i, width in enumerate(reversed(widths)):
    cin, out = out, width
    for j in range(layers + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else out, out)
    if i < len(widths) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", out, out)
  norm("decoder.conv_norm_out", widths[0])
  conv("decoder.conv_out", widths[0], cfg["out_channels"])
  conv("quant_conv", 2 * latent, 2 * latent, 1)
  conv("post_quant_conv", latent, latent, 1)
  return shapes


def random_state_dict(seed=0) -> dict[str, np.ndarray]:
  """float32 diffusers state dict for TINY_JSON: kernels ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases
  ~ N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in diffusers_shapes(TINY_JSON).items():
    if len(shape) > 1:
      sd[name] = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    else:
      sd[name] = name.endswith(".weight") + 0.1 * rng.standard_normal(shape)
    sd[name] = sd[name].astype(np.float32)
  return sd


# NumPy float64 reference on the torch-layout state dict: activations NCHW, conv weights OIHW, linear [out, in].

def ref_conv(x, w, b, pad=None, stride=1):
  """pad: (top, bottom, left, right); default "same" for an odd kernel."""
  k = w.shape[-1]
  top, bottom, left, right = (k // 2,) * 4 if pad is None else pad
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  oh, ow = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = sum(np.einsum("nchw,oc->nohw", x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride], w[:, :, i, j])
            for i in range(k) for j in range(k))
  return out + b[None, :, None, None]


def ref_group_norm(x, w, b, groups):
  n, c, h, ww = x.shape
  g = x.reshape(n, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
  return g.reshape(n, c, h, ww) * w[None, :, None, None] + b[None, :, None, None]


def silu(x):
  return x / (1 + np.exp(-x))


class Reference:
  """diffusers AutoencoderKL forward in NumPy float64."""

  def __init__(self, sd, cfg):
    self.sd = {k: v.astype(np.float64) for k, v in sd.items()}
    self.cfg = cfg

  def conv(self, name, x, **kw):
    return ref_conv(x, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], **kw)

  def norm(self, name, x):
    return ref_group_norm(x, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], self.cfg["norm_num_groups"])

  def linear(self, name, x):
    return x @ self.sd[f"{name}.weight"].T + self.sd[f"{name}.bias"]

  def resnet(self, name, x):
    h = self.conv(f"{name}.conv1", silu(self.norm(f"{name}.norm1", x)))
    h = self.conv(f"{name}.conv2", silu(self.norm(f"{name}.norm2", h)))
    if f"{name}.conv_shortcut.weight" in self.sd:
      x = self.conv(f"{name}.conv_shortcut", x)
    return x + h

  def attention(self, name, x):
    n, c, h, w = x.shape
    y = self.norm(f"{name}.group_norm", x).reshape(n, c, h * w).transpose(0, 2, 1)
    q, k, v = (self.linear(f"{name}.{p}", y) for p in ("to_q", "to_k", "to_v"))
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(c)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return x + self.linear(f"{name}.to_out.0", probs @ v).transpose(0, 2, 1).reshape(n, c, h, w)

  def mid(self, name, x):
    x = self.resnet(f"{name}.resnets.0", x)
    return self.resnet(f"{name}.resnets.1", self.attention(f"{name}.attentions.0", x))

  def encode(self, images):
    """images NHWC -> (mean, logvar) NHWC."""
    levels, layers = len(self.cfg["block_out_channels"]), self.cfg["layers_per_block"]
    x = self.conv("encoder.conv_in", images.transpose(0, 3, 1, 2).astype(np.float64))
    for i in range(levels):
      for j in range(layers):
        x = self.resnet(f"encoder.down_blocks.{i}.resnets.{j}", x)
      if i < levels - 1:
        x = self.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", x, pad=(0, 1, 0, 1), stride=2)
    x = self.mid("encoder.mid_block", x)
    x = self.conv("encoder.conv_out", silu(self.norm("encoder.conv_norm_out", x)))
    moments = self.conv("quant_conv", x).transpose(0, 2, 3, 1)
    c = self.cfg["latent_channels"]
    return moments[..., :c], np.clip(moments[..., c:], -30.0, 20.0)

  def decode(self, latents):
    """latents NHWC -> images NHWC."""
    levels, layers = len(self.cfg["block_out_channels"]), self.cfg["layers_per_block"]
    x = self.conv("post_quant_conv", latents.transpose(0, 3, 1, 2).astype(np.float64))
    x = self.mid("decoder.mid_block", self.conv("decoder.conv_in", x))
    for i in range(levels):
      for j in range(layers + 1):
        x = self.resnet(f"decoder.up_blocks.{i}.resnets.{j}", x)
      if i < levels - 1:
        x = self.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", x.repeat(2, axis=2).repeat(2, axis=3))
    x = self.conv("decoder.conv_out", silu(self.norm("decoder.conv_norm_out", x)))
    return x.transpose(0, 2, 3, 1)


def write_diffusers(directory, sd, cfg=TINY_JSON):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(cfg))
  safetensors.numpy.save_file(sd, str(directory / "diffusion_pytorch_model.safetensors"))
  return directory


def legacy(sd):
  """The same state dict under the old diffusers attention names, projections stored as 1x1 convs."""
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = {}
  for key, value in sd.items():
    for new, old in renames.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    out[key] = value
  return out


def assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for path in fa:
    assert np.asarray(fa[path]).dtype == np.asarray(fb[path]).dtype == np.float32, path
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))


@functools.lru_cache
def apply_fns(config):
  model = vae.AutoencoderKL(config)
  return (jax.jit(functools.partial(model.apply, method=vae.AutoencoderKL.encode)),
          jax.jit(functools.partial(model.apply, method=vae.AutoencoderKL.decode)))


def test_config():
  assert vae.VAEConfig().downsample == 8 and TINY.downsample == 2
  assert vae.VAEConfig.from_diffusers(TINY_JSON) == TINY
  written = TINY.to_diffusers()
  assert written == {k: v for k, v in TINY_JSON.items() if k not in ("_diffusers_version", "sample_size",
                                                                    "scaling_factor", "force_upcast")}
  assert vae.VAEConfig.from_diffusers(json.loads(json.dumps(written))) == TINY
  with pytest.raises(ValueError, match="act_fn"):
    vae.VAEConfig.from_diffusers(TINY_JSON | {"act_fn": "relu"})
  with pytest.raises(ValueError, match="up_block_types"):
    vae.VAEConfig.from_diffusers(TINY_JSON | {"up_block_types": ["AttnUpDecoderBlock2D"] * 2})
  with pytest.raises(ValueError, match="latent_channels"):
    vae.VAEConfig.from_diffusers({k: v for k, v in TINY_JSON.items() if k != "latent_channels"})
  with pytest.raises(ValueError, match="block_out_channels.*norm_num_groups"):
    vae.VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)


@pytest.mark.parametrize("levels", [3, 4])
def test_shapes(levels):
  config = vae.VAEConfig(block_out_channels=(8,) + (16,) * (levels - 1), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4)
  f = config.downsample
  assert f == 2 ** (levels - 1)
  model, images = vae.AutoencoderKL(config), jnp.zeros((2, 16, 24, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  mean, logvar = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, images)
  assert mean.shape == logvar.shape == (2, 16 // f, 24 // f, 4)
  assert jax.eval_shape(functools.partial(model.apply, method=model.decode), variables, mean).shape == (2, 16, 24, 3)
  outputs = jax.eval_shape(model.apply, variables, images, jax.random.key(1))
  assert [o.shape for o in outputs] == [(2, 16, 24, 3), mean.shape, mean.shape]
  with pytest.raises(ValueError, match="multiple"):
    jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, jnp.zeros((2, 16, 18, 3)))


def test_default_param_count():
  """The default is the LDM / Stable Diffusion VAE with 8 latent channels; the paper's VAE has 86M parameters."""
  images = jnp.zeros((1, 8, 8, 3))
  for latent, count in ((8, DEFAULT_PARAMS), (4, 83_653_863)):           # 83,653,863: the SD VAE
    config = vae.VAEConfig(latent_channels=latent)
    variables = jax.eval_shape(vae.AutoencoderKL(config).init, jax.random.key(0), images)
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(nn.unbox(variables))) == count
    assert sum(math.prod(s) for s in diffusers_shapes(config.to_diffusers()).values()) == count
  assert 75e6 < DEFAULT_PARAMS < 95e6


def test_diffusers_import_matches_reference(tmp_path):
  """load_diffusers + encode / decode agree with the float64 reference on the torch-layout weights.

  Tolerance: float32 against float64 through ~20 layers with O(1) activations; errors are ~1e-6, so 1e-4 absolute
  leaves margin while any layout or layer mistake gives O(0.1) differences.
  """
  sd = random_state_dict()
  config, params = vae.load_diffusers(write_diffusers(tmp_path / "vae", sd))
  assert config == TINY
  images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)   # H != W catches transposes
  latents = np.random.default_rng(2).standard_normal((2, 4, 6, 4)).astype(np.float32)
  encode, decode = apply_fns(TINY)
  ref = Reference(sd, TINY_JSON)
  mean, logvar = encode({"params": params}, images)
  ref_mean, ref_logvar = ref.encode(images)
  assert mean.shape == ref_mean.shape == (2, 4, 6, 4)
  decoded, ref_decoded = decode({"params": params}, latents), ref.decode(latents)
  assert decoded.shape == ref_decoded.shape == (2, 8, 12, 3)
  for got, want in ((mean, ref_mean), (logvar, ref_logvar), (decoded, ref_decoded)):
    assert np.abs(want).max() > 0.1                                       # the comparison is not vacuous
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_conversion_round_trips(tmp_path):
  sd = random_state_dict()
  params = vae.params_from_diffusers(sd, TINY)
  back = vae.params_to_diffusers(params)
  assert back.keys() == sd.keys()
  for key, value in sd.items():
    assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert_trees_equal(vae.params_from_diffusers(legacy(sd), TINY), params)

  vae.save_diffusers(tmp_path / "saved", TINY, params)
  assert json.loads((tmp_path / "saved" / "config.json").read_text()) == TINY.to_diffusers()
  for path in (tmp_path / "saved", tmp_path / "saved" / "diffusion_pytorch_model.safetensors"):
    config, loaded = vae.load_diffusers(path)
    assert config == TINY
    assert_trees_equal(loaded, params)


def test_conversion_errors(tmp_path):
  sd = random_state_dict()
  with pytest.raises(ValueError, match=r"missing decoder\.mid_block\.attentions\.0\.to_out\.0\.bias"):
    vae.params_from_diffusers({k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_out.0.bias"},
                              TINY)
  with pytest.raises(ValueError, match=r"unexpected encoder\.extra\.weight"):
    vae.params_from_diffusers(sd | {"encoder.extra.weight": np.zeros(3, np.float32)}, TINY)
  with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight: expected shape \(8, 3, 3, 3\), got \(8, 3, 1, 1\)"):
    vae.params_from_diffusers(sd | {"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)}, TINY)
  with pytest.raises(ValueError, match="same parameter"):
    vae.params_from_diffusers(sd | legacy(sd), TINY)
  with pytest.raises(ValueError, match="missing"):
    vae.params_from_diffusers(sd, vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=2, latent_channels=4,
                                                norm_num_groups=4))

  directory = write_diffusers(tmp_path / "vae", sd)
  (directory / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae.load_diffusers(directory)
  (directory / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json"):
    vae.load_diffusers(directory)
  (directory / "config.json").write_text(json.dumps(TINY_JSON))
  (directory / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
    vae.load_diffusers(directory)
  (directory / "diffusion_pytorch_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    vae.load_diffusers(directory)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    vae.load_diffusers(tmp_path / "nowhere")


def squares(n=4, size=16):
  """n images [n, size, size, 3] in [-1, 1]: a coloured square on a grey background, different per image."""
  images = np.full((n, size, size, 3), -0.2, np.float32)
  colours = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
  for i in range(n):
    top, left = 2 + 3 * i % 8, 6 - i
    images[i, top:top + 7, left:left + 7] = colours[i % 4]
  return images


def test_tiny_overfit():
  """Adam on L1 + KL_WEIGHT * KL of sampled latents. The reconstruction error more than halves and ends below that
  of the per-pixel median image (the best a decoder ignoring the latents can do), and the KL falls."""
  kl_weight, steps = 1e-4, 200
  model, images = vae.AutoencoderKL(TINY), jnp.asarray(squares())
  params = vae.params_from_diffusers(random_state_dict(), TINY)          # numpy init: no random program to compile
  optimizer = optax.adam(3e-3)

  def loss_fn(params, key):
    recon, mean, logvar = model.apply({"params": params}, images, key)
    l1, kl = jnp.mean(jnp.abs(recon - images)), jnp.mean(vae.kl_divergence(mean, logvar))
    return l1 + kl_weight * kl, (l1, kl)

  @jax.jit
  def step(params, opt_state, key):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state, history = optimizer.init(params), []
  for key in jax.random.split(jax.random.key(1), steps):
    params, opt_state, metrics = step(params, opt_state, key)
    history.append(metrics)
  l1, kl = np.asarray(history).T
  print(f"L1 {l1[0]:.3f} -> {l1[-10:].mean():.3f}, KL {kl[0]:.1f} -> {kl[-10:].mean():.1f}")
  assert np.all(np.isfinite(l1)) and np.all(np.isfinite(kl))
  blind = np.abs(images - np.median(images, axis=0)).mean()
  assert l1[-10:].mean() < min(0.5 * l1[0], 0.8 * blind)
  assert kl[-10:].mean() < 0.5 * kl[0]


def test_kl_divergence():
  mean = jnp.array([[[0.0, 1.0]], [[2.0, 0.0]]])
  logvar = jnp.array([[[0.0, 0.0]], [[0.0, jnp.log(2.0)]]])
  expected = [0.5, 0.5 * (4.0 + (2.0 - 1.0 - math.log(2.0)))]
  np.testing.assert_allclose(vae.kl_divergence(mean, logvar), expected, rtol=1e-6)


def test_logical_axis_names():
  variables = jax.eval_shape(vae.AutoencoderKL(TINY).init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  assert all(v.value.dtype == jnp.float32 for v in logically_partitioned_params(variables))
  names = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"], sep="/")
  assert names["encoder/down_blocks_0/downsamplers_0/conv/kernel"] == PartitionSpec(*vae.CONV_AXES)
  assert names["decoder/mid_block/attentions_0/to_out_0/kernel"] == PartitionSpec("vae_in", "vae_out")
  assert names["decoder/mid_block/attentions_0/group_norm/scale"] == PartitionSpec("vae_out")
  assert names["quant_conv/bias"] == PartitionSpec("vae_out")
