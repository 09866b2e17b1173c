"""The config schema: every field with its default, and validation.

Experiment files in `experiments/` start from `default_config()` and change what they need. The
fields users turn most are top level; the rest is grouped (`model`, `diffusion`, `data`, `optim`,
`sample`, `mesh`). `validate(config)` checks each field and runs before any compute, naming the field at
fault; `spec.resolve(config)` validates and resolves the config into the run spec, whose constructors check
how the image, latent, patch and row sizes fit together.
"""
import importlib.util
import json

import ml_collections
import numpy as np

from tfusion import diffusion
from tfusion.models import patching, transformer, transfusion


def default_config() -> ml_collections.ConfigDict:
  """Every field tfusion reads, with the paper's values where the paper gives one."""
  c = ml_collections.ConfigDict()
  c.total_steps = 1000
  c.batch_size = 8               # global rows per step
  c.microbatches = 1             # gradient accumulation: the batch runs as this many sequential slices
  c.seq_len = 512                # elements per row (text tokens + image patches)
  c.seed = 0
  c.log_every = 10
  c.ckpt_every = 200
  c.sample_every = 500
  c.eval_every = 0               # held-out evaluation (tfusion.evaluate) every this many steps; 0 = off
  c.eval_examples = 64           # held-out images captioned and captions drawn per evaluation
  c.eval_inception_weights = ""  # FID Inception-v3 safetensors (tfusion.evaluation.inception); "" = no FID
  c.eval_clip = ""               # Hugging Face CLIP directory (tfusion.evaluation.clip); "" = no CLIP score
  c.max_to_keep = 3
  c.ema_decay = 0.9999           # EMA of the params (warmed up), used by samples, evaluation, generate and export;
  #                                0 = off (the paper states none)
  c.peak_tflops_per_device = 0.0  # MFU denominator; 0 = known peak of the device kind (CPU: measured)
  c.init_from = ""               # fine-tuning: start from the params (and tokenizer) of a training workdir's
  #                                latest checkpoint or of <workdir>/checkpoints/<step>; fresh optimizer and data
  c.nonfinite_skip_limit = 0     # 0: a NaN / inf loss or update stops the run; N: such steps are skipped (update
  #                                dropped, counted in metrics as skipped_steps), more than N in a row stop it
  c.z_loss_weight = 0.0          # w in L = L_LM + lambda * L_DDPM + w * mean over text targets of log(Z)^2 (z-loss,
  #                                Chameleon's "denominator loss"; PaLM uses 1e-4); 0 = off (Transfusion)

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 768          # SwiGLU hidden width
  c.model.patch_size = 2         # k: a k x k window of latent pixels is one transformer element
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-5
  c.model.dtype = "float32"      # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat_policy = "none"  # none | full | dots_saveable (on the scanned layers)
  c.model.attention = "dense"     # dense (einsum + mask) | chunked (blocks, hidden ones skipped) | dot_product
                                  # (jax.nn) | flash (Pallas TPU kernel skipping hidden blocks; TPU only)
  c.model.attention_chunk = 512   # block length of chunked and flash attention
  c.model.image_attention = "bidirectional"  # inside an image: bidirectional (the paper) | causal (Table 5
  #                                            ablation; in the transformer only: a U-Net encoder still mixes patches)
  c.model.qk_norm = False        # RMSNorm of each head's queries and keys before RoPE (Chameleon; not Transfusion)
  c.model.norm_placement = "pre"  # pre: x + f(norm(x)) (Llama, Transfusion) | branch_output: x + norm(f(x))
  #                                 (Chameleon's norm reordering)
  c.model.patch_encoder = "linear"  # linear | unet
  c.model.unet_channels = (256, 512)  # U-Net width per resolution level (log2(patch_size) + 1 levels)
  c.model.unet_res_blocks = 2
  c.model.unet_skip_empty_slots = False  # True: run the U-Net on the images rows hold, a row's slots at a time,
  #                                        skipping empty slots (same outputs). Off by default: on XLA:CPU a weight
  #                                        gradient under control flow is 20x slower (docs/results.md)
  c.model.decoder_input = "final_norm"  # the patch decoder reads the final RMSNorm's output (as the LM head) |
  #                                       pre_norm: the residual stream before it
  c.model.decoder_head = "linear"       # linear patch decoder: linear | adaln_zero (DiT's timestep-modulated final layer)
  c.model.decoder_skip = False          # linear patch decoder: add a timestep-gated copy of the noisy input patch

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.schedule = "cosine"
  c.diffusion.loss_weight = 5.0          # lambda in L = L_LM + lambda * L_DDPM
  c.diffusion.image_first_max_t = 500    # noise limiting cap for image-before-caption pairs
  c.diffusion.prediction = "v"           # the patch decoder predicts v (velocity; ours, see docs/results.md) |
  #                                        eps (the paper; experiments/transfusion_paper.py keeps it)
  c.diffusion.min_snr_gamma = 0.0        # Min-SNR-gamma weighting of the image MSE; 0 = off (the paper)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.image_size = 32
  c.data.codec = "identity"              # image codec: identity (pixels in [-1, 1]) | vae (a KL-VAE's latents) |
  #                                       vq (a VQ-VAE's codes as tokens: the Chameleon baseline, no diffusion)
  c.data.latent_channels = 8             # vae codec: latent channels c
  c.data.latent_downsample = 8           # vae codec: image size / latent size f
  c.data.codebook_size = 16_384         # vq codec: codes of the VQ-VAE (paper: 16,384), appended to the vocabulary
  c.data.vae = ""                        # vae codec: a tfusion.train_vae workdir or a diffusers AutoencoderKL dir;
  #                                       vq codec: a tfusion.train_vae workdir with model.bottleneck = "vq"
  c.data.latent_cache = ""               # vae / vq codec: latents / codes written by python -m tfusion.encode_latents
  c.data.text_source = "pydoc"           # "pydoc" (ships with Python) or a .jsonl of {"text": ...}
  c.data.text_fraction = 0.5             # share of elements from the text-only stream (paper: 1:1)
  c.data.caption_first_prob = 0.8
  c.data.caption_dropout_prob = 0.1      # caption-first pairs with an empty caption, for CFG (paper: unstated)
  c.data.vocab_size = 1024
  c.data.text_test_fraction = 0.1        # documents held out from the text stream
  c.data.mixture = ml_collections.ConfigDict()  # name -> {path, weight, split} of tfusion.prepare directories;
  #                                       empty: the embedded shapes + text_source, mixed by text_fraction
  c.data.tokenizer = ""                  # a sentencepiece .model; "" = the prepared text's, else trained
  c.data.sample_split = "test"           # mixture: samples show this split of the first image-caption source
  c.data.workers = 0                     # grain worker processes per host (0: pack in the main process)
  c.data.prefetch = 2                    # rows buffered ahead (per worker with workers > 0)
  c.data.max_images_per_row = 0          # image slots per packed row (the patch encoder/decoder runs on all of
  #                                       them, empty or not); 0 = as many as seq_len holds. Keep it above the
  #                                       mix's mean images per row, or text takes the images' share

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 4000
  c.optim.final_lr_fraction = 0.05       # cosine decays to this fraction of lr (paper: 1.5e-5 / 3e-4)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0

  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 8                # fixed test captions turned into images at each sample point
  c.sample.num_captions = 8              # fixed test images captioned at each sample point
  c.sample.diffusion_steps = 250
  c.sample.max_caption_tokens = 32
  c.sample.sampler = "ddpm"              # ddpm (ancestral) | ddim
  c.sample.cfg_scale = 3.0               # classifier-free guidance of sampled images (paper ablations: 3); with
  #                                       the vq codec on the image tokens' logits
  c.sample.image_temperature = 1.0       # vq codec: temperature of sampled image tokens (0 = greedy)
  c.sample.image_top_k = 0               # vq codec: image tokens drawn among the k most likely codes (0 = all)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici_data_parallelism = -1       # -1: all devices not used by the other axes
  c.mesh.ici_fsdp_parallelism = 1
  c.mesh.ici_tensor_parallelism = 1
  c.mesh.dcn_data_parallelism = 1        # across slices (multi-slice TPU / nodes); -1: the rest
  c.mesh.dcn_fsdp_parallelism = 1
  c.mesh.dcn_tensor_parallelism = 1
  return c


# Paper Table 2: layers, d_model, heads (experiments/transfusion_paper.py). SwiGLU width 8/3 d rounded up to a
# multiple of 256 (Llama).
PAPER_SIZES = {
    "160m": (16, 768, 12),
    "370m": (24, 1024, 16),
    "760m": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


def swiglu_width(d_model: int) -> int:
  return -(-8 * d_model // 3 // 256) * 256


def load_experiment(path: str) -> ml_collections.ConfigDict:
  """The config of an experiment file as --config reads it: "experiments/x.py" or "experiments/x.py:arg"."""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("experiment", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def default_vae_config() -> ml_collections.ConfigDict:
  """Every field tfusion.train_vae reads. The loss is the paper's (§4.1, App. A):
  L1 + LPIPS + 0.5 GAN + 0.2 ID + 1e-6 KL with the GAN on from step 50k; LPIPS and the MoCo v2 identity
  term run only when their weights files are given. The architecture defaults are the LDM / SD
  KL-VAE widths with 8 latent channels and f = 8 (84M parameters; the paper's is 86M). With
  model.bottleneck = "vq" the same network is the Chameleon baseline's VQ-VAE and L_codebook replaces the KL."""
  c = ml_collections.ConfigDict()
  c.total_steps = 100_000
  c.batch_size = 16
  c.seed = 0
  c.log_every = 50
  c.ckpt_every = 2000
  c.sample_every = 2000          # reconstruction grid of test images and test PSNR
  c.max_to_keep = 3

  c.model = ml_collections.ConfigDict()
  c.model.block_out_channels = (128, 256, 512, 512)   # width per level; f = 2 ** (levels - 1)
  c.model.layers_per_block = 2
  c.model.latent_channels = 8     # kl: latent channels c; vq: the encoder's output width before the projection
  c.model.norm_num_groups = 32
  c.model.bottleneck = "kl"       # kl: the VAE of Transfusion | vq: the VQ-VAE of the Chameleon baseline (the
  #                                 encoder's outputs projected to vq_dim, each replaced by its nearest code)
  c.model.vq_dim = 8              # vq: dims of a code (paper: 8)
  c.model.codebook_size = 16_384  # vq: codes (paper: 16,384)
  c.model.codebook_restart_steps = 100  # vq: against dead codes, a code chosen by none of the last this many
  #                                       batches is restarted at a random encoder output of the current batch

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0          # mean absolute pixel error, images in [-1, 1]
  c.loss.kl_weight = 1e-6         # kl: KL summed over latent dims, mean over images
  c.loss.codebook_weight = 1.0    # vq: weight of the codebook + commitment loss (the paper's L_codebook)
  c.loss.commitment_beta = 0.25   # vq: L_codebook = mean (sg[z_e] - e)^2 + beta mean (z_e - sg[e])^2
  c.loss.lpips_weight = 1.0
  c.loss.lpips_params = ""        # safetensors file of VGG16 + LPIPS weights; "" = perceptual term off
  c.loss.gan_weight = 0.5
  c.loss.gan_start_step = 50_000  # the generator's adversarial term and the discriminator train from here
  c.loss.moco_weight = 0.2        # identity term: MoCo v2 ResNet-50 feature distance
  c.loss.moco_params = ""         # safetensors file of MoCo v2 / torchvision ResNet-50 weights; "" = off

  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.channels = 64
  c.discriminator.num_layers = 3

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4               # Adam for the VAE and the discriminator; linear warmup, then constant
  c.optim.warmup_steps = 1000
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.grad_clip = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.image_size = 256

  c.mesh = default_config().mesh
  return c


def default_prepare_config() -> ml_collections.ConfigDict:
  """What python -m tfusion.prepare reads: a source, image and text processing, sharding."""
  c = ml_collections.ConfigDict()
  c.source = "image_folder"      # image_folder | jsonl (text) | edit_jsonl | tfds
  c.path = ""                    # the folder, the .jsonl file, or the TFDS dataset name
  c.captions = ""                # image_folder: a .csv / .jsonl manifest of (file, caption); "" = <stem>.txt files
  c.split = "train"              # the split name of an image_folder, jsonl or edit_jsonl source
  c.tfds = ml_collections.ConfigDict()
  c.tfds.splits = "train"        # comma-separated TFDS splits to prepare
  c.tfds.data_dir = "~/tensorflow_datasets"
  c.tfds.kind = "image_caption"  # image_caption | text
  c.tfds.image_key = "image"     # feature names; "/" reaches into nested features (coco: captions/text)
  c.tfds.caption_key = "caption"
  c.tfds.text_key = "text"
  c.image_size = 256             # centre crop, then resize to image_size x image_size
  c.min_image_size = 64          # images with a shorter side are skipped as too small
  c.vae = ""                     # encode images to latents with this VAE (train_vae workdir or diffusers dir)
  c.tokenizer = ""               # text: an existing sentencepiece .model; "" = train one on a sample
  c.vocab_size = 32_000          # text: vocab of a trained tokenizer (paper: 32K)
  c.tokenizer_sample = 100_000   # text: documents the tokenizer trains on (the first ones)
  c.examples_per_shard = 1024    # a shard is the unit of work, of resuming and of hashing
  c.workers = 0                  # worker processes (0: prepare in the main process)
  return c


def validate_prepare(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first invalid field of a prepare config."""
  _check_fields(config, default_prepare_config(),
                positive_ints=("image_size", "min_image_size", "vocab_size", "tokenizer_sample",
                               "examples_per_shard"),
                choices={"source": ("image_folder", "jsonl", "edit_jsonl", "tfds"),
                         "tfds.kind": ("image_caption", "text")})
  if not config.path:
    _fail(config, "path", "is empty: the folder, .jsonl file or TFDS dataset name to prepare")
  if config.workers < 0:
    _fail(config, "workers", "must be >= 0")


def validate_vae(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first invalid field of a VAE training config."""
  _check_fields(config, default_vae_config(),
                positive_ints=("total_steps", "batch_size", "log_every", "ckpt_every", "sample_every",
                               "max_to_keep", "model.layers_per_block", "model.latent_channels",
                               "model.norm_num_groups", "discriminator.channels", "discriminator.num_layers",
                               "optim.warmup_steps", "data.image_size", "model.vq_dim", "model.codebook_size",
                               "model.codebook_restart_steps"),
                choices={"model.bottleneck": BOTTLENECKS})
  if config.model.codebook_size < 2:
    _fail(config, "model.codebook_size", "needs at least 2 codes")
  widths = config.model.block_out_channels
  if not widths or any(w % config.model.norm_num_groups for w in widths):
    _fail(config, "model.block_out_channels", f"needs widths divisible by model.norm_num_groups = "
          f"{config.model.norm_num_groups}")
  if config.data.image_size % 2 ** (len(widths) - 1):
    _fail(config, "data.image_size", f"must be divisible by the downsampling factor {2 ** (len(widths) - 1)}")
  for field in ("loss.l1_weight", "loss.kl_weight", "loss.lpips_weight", "loss.gan_weight", "loss.gan_start_step",
                "loss.moco_weight", "loss.codebook_weight", "loss.commitment_beta"):
    if _get(config, field) < 0:
      _fail(config, field, "must be >= 0")
  _validate_optimizer(config)


def _validate_optimizer(config) -> None:
  """Learning rate finite in float32 (the optimizer's dtype) and > 0, Adam betas in [0, 1), eps > 0,
  weight decay >= 0, gradient clip > 0: other values make the first updates NaN or inf."""
  low_inclusive = {"lr": False, "b1": True, "b2": True, "eps": False, "weight_decay": True, "grad_clip": False}
  for name, inclusive in low_inclusive.items():
    if name not in config.optim:
      continue
    value = config.optim[name]
    if not abs(value) <= float(np.finfo(np.float32).max):      # also NaN
      _fail(config, f"optim.{name}", "must be finite in float32 (|x| < 3.4e38)")
    if value < 0 or (value == 0 and not inclusive):
      _fail(config, f"optim.{name}", f"must be {'>=' if inclusive else '>'} 0")
    if name in ("b1", "b2") and value >= 1:
      _fail(config, f"optim.{name}", "must be < 1")


BOTTLENECKS = ("kl", "vq")     # VAE model.bottleneck: Gaussian latents (models/vae.AutoencoderKL) or codes (VQModel)
CODECS = ("identity", "vae", "vq")   # data.codec: pixels in [-1, 1], a frozen KL-VAE's latents, or a VQ-VAE's codes
_POSITIVE_INTS = ("total_steps", "batch_size", "microbatches", "seq_len", "log_every", "ckpt_every", "sample_every",
                  "eval_examples", "max_to_keep", "model.num_layers", "model.d_model", "model.num_heads",
                  "model.mlp_dim", "model.patch_size", "model.attention_chunk", "model.unet_res_blocks",
                  "data.latent_channels", "data.latent_downsample", "diffusion.num_timesteps", "data.image_size",
                  "data.vocab_size", "data.codebook_size",
                  "optim.warmup_steps", "sample.num_images", "sample.num_captions",
                  "sample.diffusion_steps", "sample.max_caption_tokens")
_FRACTIONS = ("data.text_fraction", "data.caption_first_prob", "data.caption_dropout_prob", "data.text_test_fraction",
              "optim.final_lr_fraction")
_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("none", *transformer.REMAT_POLICIES),
    "model.attention": transformer.ATTENTIONS,
    "model.image_attention": transformer.IMAGE_ATTENTIONS,
    "model.norm_placement": transformer.NORM_PLACEMENTS,
    "model.patch_encoder": transfusion.PATCH_ENCODERS,
    "model.decoder_input": transfusion.DECODER_INPUTS,
    "model.decoder_head": patching.DECODER_HEADS,
    "diffusion.prediction": diffusion.PREDICTIONS,
    "diffusion.schedule": diffusion.SCHEDULES,
    "data.codec": CODECS,
    "sample.sampler": diffusion.SAMPLERS,
}


# Fields added after runs were first recorded, with the value that reproduces those runs: a recorded config
# without the field was written when tfusion behaved this way, whatever today's default is.
VALUES_BEFORE_FIELD_EXISTED = {
    "ema_decay": 0.0,
    "model.decoder_input": "final_norm",
    "model.decoder_head": "linear",
    "model.decoder_skip": False,
    "diffusion.prediction": "eps",
    "diffusion.min_snr_gamma": 0.0,
    "z_loss_weight": 0.0,
    "model.qk_norm": False,
    "model.norm_placement": "pre",
}


def from_json(text: str, source: str = "config.json",
              defaults: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The config a run recorded (ConfigDict.to_json), over today's defaults (default_config() unless given, with
  VALUES_BEFORE_FIELD_EXISTED for the fields the record lacks); ConfigError names a field the defaults do not
  have."""
  config = defaults
  if config is None:
    config = default_config()
    for dotted, value in VALUES_BEFORE_FIELD_EXISTED.items():
      *group, name = dotted.split(".")
      (config[group[0]] if group else config)[name] = value
  for group, values in json.loads(text).items():
    if group not in config:
      raise ConfigError(f"{source}: unknown field {group!r}")
    if not isinstance(config[group], ml_collections.ConfigDict):
      config[group] = values
      continue
    for key, value in values.items():
      if key not in config[group]:
        raise ConfigError(f"{source}: unknown field {group}.{key}")
      config[group][key] = tuple(value) if isinstance(config[group][key], tuple) else value
  return config


class ConfigError(ValueError):
  """A config field has an invalid value; the message names the field."""


def _get(config, dotted):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def field_error(field: str, value, why: str) -> ConfigError:
  """The error of a field with an invalid value: config.<field> = <value>: <why>."""
  return ConfigError(f"config.{field} = {value!r}: {why}")


def _fail(config, field, why):
  raise field_error(field, _get(config, field), why)


def _check_fields(config, defaults, positive_ints=(), fractions=(), choices=None) -> None:
  """Same fields as `defaults` (top level and groups); positive ints, [0, 1] fractions, choices."""
  unknown = set(config.keys()) ^ set(defaults.keys())
  if unknown:
    raise ConfigError(f"config has unknown or missing top-level fields: {sorted(unknown)}")
  for group, group_defaults in defaults.items():
    if isinstance(group_defaults, ml_collections.ConfigDict):
      diff = set(config[group].keys()) ^ set(group_defaults.keys())
      if diff:
        raise ConfigError(f"config.{group} has unknown or missing fields: {sorted(diff)}")
  for field in positive_ints:
    value = _get(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(config, field, "must be a positive integer")
  for field in fractions:
    if not 0.0 <= _get(config, field) <= 1.0:
      _fail(config, field, "must be in [0, 1]")
  for field, allowed in (choices or {}).items():
    if _get(config, field) not in allowed:
      _fail(config, field, f"must be one of {allowed}")
  for axis in config.get("mesh", {}):
    if config.mesh[axis] == 0 or config.mesh[axis] < -1:
      _fail(config, f"mesh.{axis}", "must be a positive integer or -1")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first invalid field. Cheap: runs before any compute. How the image, latent,
  patch and row sizes fit together is checked by spec.resolve, which calls this first."""
  _check_fields(config, default_config(), _POSITIVE_INTS, _FRACTIONS, _CHOICES)

  def fail(field, why):
    _fail(config, field, why)

  if config.diffusion.loss_weight < 0:
    fail("diffusion.loss_weight", "must be >= 0")
  if config.diffusion.min_snr_gamma < 0:
    fail("diffusion.min_snr_gamma", "must be >= 0 (0 = off)")
  if not 0.0 <= config.z_loss_weight < float("inf"):     # also NaN
    fail("z_loss_weight", "must be finite and >= 0 (0 = off)")
  if not 0.0 <= config.ema_decay < 1.0:
    fail("ema_decay", "must be in [0, 1) (0 = no EMA)")
  if config.model.patch_encoder == "unet":
    for field, plain in (("decoder_head", "linear"), ("decoder_skip", False)):
      if config.model[field] != plain:
        fail(f"model.{field}", "applies to the linear patch decoder only (model.patch_encoder = 'linear')")
  if not 1 <= config.diffusion.image_first_max_t <= config.diffusion.num_timesteps:
    fail("diffusion.image_first_max_t", "must be in [1, diffusion.num_timesteps]")
  if config.sample.diffusion_steps > config.diffusion.num_timesteps:
    fail("sample.diffusion_steps", "must be <= diffusion.num_timesteps")
  if config.model.d_model % config.model.num_heads:
    fail("model.d_model", f"must be divisible by model.num_heads = {config.model.num_heads}")
  if (config.model.d_model // config.model.num_heads) % 2:
    fail("model.num_heads", "head dim (d_model / num_heads) must be even for RoPE")
  if config.batch_size % config.microbatches:
    fail("microbatches", f"must divide batch_size = {config.batch_size}")
  if config.model.attention == "chunked" and config.seq_len % config.model.attention_chunk:
    fail("model.attention_chunk", f"must divide seq_len = {config.seq_len} for chunked attention")
  if config.model.attention == "flash" and (config.seq_len % config.model.attention_chunk
                                            or config.model.attention_chunk % 128):
    fail("model.attention_chunk", f"must be a multiple of 128 dividing seq_len = {config.seq_len} for flash attention")
  if config.peak_tflops_per_device < 0:
    fail("peak_tflops_per_device", "must be >= 0 (0 = look up / measure)")
  if config.sample.cfg_scale < 0:
    fail("sample.cfg_scale", "must be >= 0 (1 = no guidance)")
  _validate_optimizer(config)
  if not isinstance(config.nonfinite_skip_limit, int) or config.nonfinite_skip_limit < 0:
    fail("nonfinite_skip_limit", "must be >= 0 (0 = stop at the first non-finite step)")
  if config.eval_every < 0:
    fail("eval_every", "must be >= 0 (0 = no evaluation during training)")
  if config.data.codec == "vq":
    if config.model.patch_size != 1:
      fail("model.patch_size", "must be 1 with the vq codec (one code is one token)")
    if config.sample.image_temperature < 0 or config.sample.image_top_k < 0:
      fail("sample.image_temperature", f"and sample.image_top_k = {config.sample.image_top_k} must be >= 0")
  max_images = config.data.max_images_per_row
  if not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 0:
    fail("data.max_images_per_row", "must be an int >= 0 (0 = as many images as seq_len holds)")
  _validate_mixture(config)


MIXTURE_FIELDS = ("path", "weight", "split")


def _validate_mixture(config) -> None:
  for name, entry in config.data.mixture.items():
    field = f"data.mixture.{name}"
    if not isinstance(entry, ml_collections.ConfigDict) or sorted(entry.keys()) != sorted(MIXTURE_FIELDS):
      raise ConfigError(f"config.{field} must have exactly the fields {list(MIXTURE_FIELDS)}")
    if not entry.path:
      _fail(config, f"{field}.path", "is empty: a directory written by python -m tfusion.prepare")
    if not entry.weight >= 0:
      _fail(config, f"{field}.weight", "must be >= 0")
  if config.data.mixture and not any(e.weight > 0 for e in config.data.mixture.values()):
    raise ConfigError("config.data.mixture: every weight is 0")
