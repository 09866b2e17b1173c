"""The Transfusion model: one transformer over text tokens and image patches, with two heads.

Text tokens are embedded; each noised image is patchified and linearly encoded (with its timestep);
the patch vectors take the image slots of the sequence; the transformer runs under the Transfusion
mask; the LM head gives next-token logits and the patch decoder gives the epsilon prediction.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.models import patching
from tfusion.models.transformer import Projection, Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class TransfusionConfig:
  transformer: TransformerConfig
  vocab_size: int
  latent_shape: tuple[int, int, int]   # (h, w, c) of one image latent
  patch_size: int

  @property
  def patches_per_image(self) -> int:
    h, w, _ = self.latent_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.latent_shape[2]


def config_from(config, vocab_size: int, latent_shape) -> TransfusionConfig:
  """Build the model config from an experiment ConfigDict."""
  m = config.model
  return TransfusionConfig(
      transformer=TransformerConfig(
          num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
          rope_theta=m.rope_theta, norm_eps=m.norm_eps, dtype=jnp.dtype(m.dtype),
          param_dtype=jnp.dtype(m.param_dtype), remat_policy=m.remat_policy, attention=m.attention,
          attention_chunk=m.attention_chunk),
      vocab_size=vocab_size, latent_shape=tuple(latent_shape), patch_size=m.patch_size)


def patch_slot_positions(image_ids, num_slots):
  """Sequence positions of the patch slots of each row, in order.  [B, L] -> [B, num_slots] int32.

  Slots beyond the row's real patches point at position 0; callers mask them with image_valid.
  """
  return jax.vmap(lambda row: jnp.nonzero(row > 0, size=num_slots, fill_value=0)[0])(image_ids)


class Transfusion(nn.Module):
  """tokens, segment_ids, positions, image_ids: [B, L] int; noisy_latents: [B, M, h, w, c];
  timesteps: [B, M] int  ->  (logits [B, L, V] float32, eps_hat [B, M, h, w, c] float32)."""
  cfg: TransfusionConfig

  @nn.compact
  def __call__(self, tokens, segment_ids, positions, image_ids, noisy_latents, timesteps):
    cfg, tcfg = self.cfg, self.cfg.transformer
    batch, num_images = noisy_latents.shape[:2]
    num_slots = num_images * cfg.patches_per_image

    embed = nn.Embed(cfg.vocab_size, tcfg.d_model, dtype=tcfg.dtype, param_dtype=tcfg.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                     name="token_embedding")
    x_text = embed(tokens)

    patches = patching.patchify(noisy_latents, cfg.patch_size)                  # [B, M, n, p]
    x_patch = patching.LinearPatchEncoder(tcfg.d_model, tcfg.dtype, tcfg.param_dtype, name="patch_encoder")(
        patches, timesteps).reshape(batch, num_slots, tcfg.d_model)
    # The k-th patch slot of a row holds the k-th patch of the row's images, in order.
    is_patch = image_ids > 0
    slot = jnp.maximum(jnp.cumsum(is_patch, axis=1) - 1, 0)
    x_img = jnp.take_along_axis(x_patch, slot[..., None], axis=1)
    x = jnp.where(is_patch[..., None], x_img, x_text)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    h = Transformer(tcfg, name="transformer")(x, segment_ids, image_ids, positions)

    logits = Projection("bld,dv->blv", (tcfg.d_model, cfg.vocab_size), ("embed", "vocab"), (0,),
                        tcfg.dtype, tcfg.param_dtype, name="lm_head")(h)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    h_patch = jnp.take_along_axis(h, patch_slot_positions(image_ids, num_slots)[..., None], axis=1)
    eps = patching.LinearPatchDecoder(cfg.patch_dim, tcfg.dtype, tcfg.param_dtype, name="patch_decoder")(h_patch)
    eps = eps.reshape(batch, num_images, cfg.patches_per_image, cfg.patch_dim).astype(jnp.float32)
    h_lat, w_lat, _ = cfg.latent_shape
    return logits, patching.unpatchify(eps, cfg.patch_size, h_lat, w_lat)
