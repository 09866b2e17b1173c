"""The Transfusion model: one transformer over text tokens and image patches, with two heads.

Text tokens are embedded; each noised image is encoded (with its timestep) into patch vectors by a
linear layer over k x k patches or by U-Net down blocks; the patch vectors take the image slots of the
sequence; the transformer runs under the Transfusion mask; the LM head gives next-token logits and the
patch decoder (linear, or U-Net up blocks with skips from the encoder) gives the epsilon prediction.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models import patching, present_images, unet
from tfusion.models.transformer import KVCache, Projection, Transformer, TransformerConfig


PATCH_ENCODERS = ("linear", "unet")
DECODER_INPUTS = ("final_norm", "pre_norm")


@dataclasses.dataclass(frozen=True)
class TransfusionConfig:
  transformer: TransformerConfig
  vocab_size: int
  latent_shape: tuple[int, int, int]   # (h, w, c) of one image latent
  patch_size: int
  patch_encoder: str = "linear"                 # linear | unet
  unet_channels: tuple[int, ...] = (256, 512)
  unet_res_blocks: int = 2
  unet_skip_empty_slots: bool = False           # the U-Net runs on present images only (present_images)
  prediction: str = "eps"                       # what the patch decoder outputs: eps | v (diffusion.PREDICTIONS)
  decoder_input: str = "final_norm"             # final_norm (the LM head's input) | pre_norm (the residual stream)
  decoder_head: str = "linear"                  # linear decoder: linear | adaln_zero (patching.DECODER_HEADS)
  decoder_skip: bool = False                    # linear decoder: timestep-gated skip from the noisy patch
  image_codes: int = 0                          # > 0: images are this many VQ codes, the last ids of the vocabulary
  #                                               (the Chameleon baseline; its rows have no image slots)

  @property
  def image_token_offset(self) -> int:
    """The id of code 0 of a discrete image (the text vocabulary's size)."""
    return self.vocab_size - self.image_codes

  @property
  def patches_per_image(self) -> int:
    h, w, _ = self.latent_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.latent_shape[2]


def patch_slot_positions(image_ids, num_slots):
  """Sequence positions of the patch slots of each row, in order.  [B, L] -> [B, num_slots] int32.

  Slots beyond the row's real patches point at position 0; callers mask them with image_valid.
  Written as a scatter-set of each patch's position into its slot, not as jnp.nonzero: nonzero's
  bincount is a scatter-add the TPU cost model cannot price (it adds -2 s to `optimal_seconds`).
  """
  is_patch = image_ids > 0
  slot = jnp.where(is_patch, jnp.cumsum(is_patch, axis=1) - 1, num_slots)   # non-patches: out of range, dropped
  position = jnp.arange(image_ids.shape[1], dtype=jnp.int32)
  return jax.vmap(lambda s: jnp.zeros(num_slots, jnp.int32).at[s].set(position, mode="drop", unique_indices=True))(slot)


class TokenEmbedding(nn.Module):
  """tokens [B, L] int -> [B, L, D]. The table is stored split like every matrix (vocab, embed) but
  gathered whole along d_model before the lookup, so the looked-up rows come out split by batch
  only (a lookup in the stored layout would split d_model and force a full reshard)."""
  vocab_size: int
  d_model: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, tokens):
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
    table = self.param("embedding", init, (self.vocab_size, self.d_model), self.param_dtype)
    table = nn.with_logical_constraint(table.astype(self.dtype), ("vocab", None))
    return jnp.take(table, tokens, axis=0)


class Transfusion(nn.Module):
  """tokens, segment_ids, positions, image_ids: [B, L] int; noisy_latents: [B, M, h, w, c];
  timesteps: [B, M] int  ->  (logits [B, L, V] float32, prediction [B, M, h, w, c] float32), the
  prediction being eps_hat or v_hat (cfg.prediction; diffusion.eps_from_prediction converts).

  Decoding (tfusion.inference.decoding): with a KVCache, the L elements are a block written at cache slots
  write_index [B, L] that attends to everything cached, and the updated cache is returned third.
  M may be 0 (a text-only block); with_logits=False skips the LM head (logits None).
  """
  cfg: TransfusionConfig

  @nn.compact
  def __call__(self, tokens, segment_ids, positions, image_ids, noisy_latents, timesteps,
               cache: KVCache | None = None, write_index=None, with_logits: bool = True):
    cfg, tcfg = self.cfg, self.cfg.transformer
    batch, num_images = noisy_latents.shape[:2]
    num_slots = num_images * cfg.patches_per_image

    x = TokenEmbedding(cfg.vocab_size, tcfg.d_model, tcfg.dtype, tcfg.param_dtype, name="token_embedding")(tokens)

    dtypes = dict(dtype=tcfg.dtype, param_dtype=tcfg.param_dtype)
    if num_images:
      if cfg.patch_encoder == "unet":
        encoder = unet.UNetPatchEncoder(tcfg.d_model, cfg.patch_size, cfg.unet_channels, cfg.unet_res_blocks,
                                        name="patch_encoder", **dtypes)
        x_patch, skips = self.per_image(encoder, image_ids, noisy_latents, timesteps)
      else:
        patches = patching.patchify(noisy_latents, cfg.patch_size)                # [B, M, n, p]
        x_patch = patching.LinearPatchEncoder(tcfg.d_model, name="patch_encoder", **dtypes)(patches, timesteps)
      x_patch = x_patch.reshape(batch, num_slots, tcfg.d_model)
      # The k-th patch slot of a row holds the k-th patch of the row's images, in order.
      is_patch = image_ids > 0
      slot = jnp.maximum(jnp.cumsum(is_patch, axis=1) - 1, 0)
      x_img = jnp.take_along_axis(x_patch, slot[..., None], axis=1)
      x = jnp.where(is_patch[..., None], x_img, x)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    transformer = Transformer(tcfg, name="transformer")
    if cache is None:
      h, residual = transformer(x, segment_ids, image_ids, positions)
    else:
      (h, residual), cache = transformer(x, segment_ids, image_ids, positions, cache, write_index)

    logits = None
    if with_logits:
      logits = Projection("bld,dv->blv", (tcfg.d_model, cfg.vocab_size), ("embed", "vocab"), (0,),
                          tcfg.dtype, tcfg.param_dtype, name="lm_head")(h)
      logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    out = jnp.zeros(noisy_latents.shape, jnp.float32)
    if num_images:
      stream = h if cfg.decoder_input == "final_norm" else residual
      h_patch = jnp.take_along_axis(stream, patch_slot_positions(image_ids, num_slots)[..., None], axis=1)
      h_patch = h_patch.reshape(batch, num_images, cfg.patches_per_image, tcfg.d_model)
      if cfg.patch_encoder == "unet":
        decoder = unet.UNetPatchDecoder(cfg.patch_size, cfg.latent_shape[2], cfg.unet_channels, cfg.unet_res_blocks,
                                        name="patch_decoder", **dtypes)
        out = self.per_image(decoder, image_ids, h_patch, timesteps, skips)
      else:
        out = patching.LinearPatchDecoder(cfg.patch_dim, cfg.decoder_head, cfg.decoder_skip, name="patch_decoder",
                                          **dtypes)(h_patch, timesteps, patching.patchify(noisy_latents, cfg.patch_size))
        out = patching.unpatchify(out, cfg.patch_size, *cfg.latent_shape[:2])
    out = out.astype(jnp.float32)
    return (logits, out) if cache is None else (logits, out, cache)

  def per_image(self, module, image_ids, *arrays):
    """module(*arrays) for a per-image network (arrays [B, M, ...]): with unet_skip_empty_slots on the images
    the rows hold only, one row's worth of slots (M) at a time, zeros at the empty slots."""
    if not self.cfg.unet_skip_empty_slots:
      return module(*arrays)
    slots = arrays[0].shape[1]
    present = present_images.present_slots(image_ids, slots, self.cfg.patches_per_image)
    return present_images.apply_present(module, present, *arrays, chunk=slots)
