r"""Transfusion at the paper's settings (Table 2, §4.1): 256 px images as 32x32x8 VAE latents in 2x2 patches,
seq 4096, 2M elements per batch, 32K vocab, AdamW (0.9, 0.95) lr 3e-4, 4000 warmup, cosine to 1.5e-5, 250k steps.

  python -m tfusion.params --config experiments/transfusion_paper.py:size=7b,encoder=unet
  python -m tfusion.aot --config experiments/transfusion_paper.py:size=7b --topology v5p:4x4x8
  launch/tpu_pod.sh TPU_NAME ZONE experiments/transfusion_paper.py:size=7b gs://BUCKET/transfusion_7b

size: 160m, 370m, 760m, 1.4b (or 1_4b) or 7b (default); encoder: linear (default) or unet.
recipe: transfusion (default) or chameleon: the stability changes the paper's Chameleon baseline adds (§4.1
Baseline): QK-norm (model.qk_norm), Chameleon's norm reordering (model.norm_placement = branch_output), z-loss
(z_loss_weight = 1e-4, PaLM's weight; the paper gives none) and lr 1e-4 (cosine to 5% of it, as the 3e-4 run).
Only these switch: images stay continuous latents under the diffusion loss (the baseline's discrete VQ image
tokens are not part of this recipe), so recipe=chameleon measures what the stability changes do to Transfusion.

  python -m tfusion.aot --config experiments/transfusion_paper.py:size=7b,recipe=chameleon --topology v5p:4x4x8
"""
from tfusion import config as config_lib

RECIPES = ("transfusion", "chameleon")


def get_config(arg="size=7b"):
  """arg: comma-separated key=value pairs, size=..., encoder=... and recipe=..."""
  args = dict(size="7b", encoder="linear", recipe="transfusion")
  for pair in filter(None, (arg or "").split(",")):
    key, _, value = pair.partition("=")
    if key not in args:
      raise ValueError(f"transfusion_paper.py:{arg}: unknown argument {key!r}; use size=..., encoder=... and "
                       "recipe=...")
    args[key] = value
  size = args["size"].replace("_", ".")
  if size not in config_lib.PAPER_SIZES:
    raise ValueError(f"unknown paper size {size!r}: one of {sorted(config_lib.PAPER_SIZES)}")
  if args["recipe"] not in RECIPES:
    raise ValueError(f"unknown recipe {args['recipe']!r}: one of {RECIPES}")
  c = config_lib.default_config()
  c.total_steps = 250_000
  c.seq_len = 4096
  c.batch_size = 512                     # 512 x 4096 = 2M elements
  c.log_every, c.ckpt_every, c.sample_every = 50, 2000, 10_000
  layers, d_model, heads = config_lib.PAPER_SIZES[size]
  c.model.num_layers, c.model.d_model, c.model.num_heads = layers, d_model, heads
  c.model.mlp_dim = config_lib.swiglu_width(d_model)
  c.model.patch_size = 2
  c.model.patch_encoder = args["encoder"]
  c.model.unet_channels = (512, 1024)    # ~0.27B encoder + decoder, as the paper's U-Net
  c.model.unet_res_blocks = 3
  c.model.dtype = "bfloat16"
  c.diffusion.prediction = "eps"         # the paper's parameterisation (x0 estimates clipped to the codec's range)
  c.model.remat_policy = "full"
  c.model.attention = "chunked"
  c.model.attention_chunk = 1024
  c.data.codec = "vae"
  c.data.image_size = 256
  c.data.latent_channels, c.data.latent_downsample = 8, 8
  c.data.vocab_size = 32_000
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 4000
  c.optim.final_lr_fraction = 1.5e-5 / 3e-4
  c.mesh.ici_data_parallelism = 1
  c.mesh.ici_fsdp_parallelism = -1      # fully sharded data parallel over every chip of a slice
  if args["recipe"] == "chameleon":
    c.model.qk_norm = True
    c.model.norm_placement = "branch_output"
    c.z_loss_weight = 1e-4
    c.optim.lr = 1e-4                    # final_lr_fraction stays 0.05: cosine to 5e-6
  return c
