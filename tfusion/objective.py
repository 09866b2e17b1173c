"""The training objective's two halves on a batch (data.sequence arrays), shared by the train step and the
held-out evaluation: next-token targets, and the model's forward pass on noised images; and the optional z-loss
on the text logits."""
import jax
import jax.numpy as jnp

from tfusion import diffusion


def text_targets(tokens):
  """Next-token targets: targets[:, l] = tokens[:, l + 1] (the last column is never a target)."""
  return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def z_loss(logits):
  """log(Z)^2 per position, log Z = logsumexp of the logits over the vocabulary: the z-loss of PaLM (Chowdhery et
  al. 2022) and Chameleon's "denominator loss", which keeps the softmax normaliser near 1.
  logits: [B, L, V] -> [B, L] float32."""
  return jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))


def forward(params, batch, t, eps, *, model, alpha_bar):
  """The model on the batch's images noised to t [B, M] with eps -> (logits, decoder output, x_t)."""
  x_t = diffusion.q_sample(batch["latents"], eps, alpha_bar[t])
  logits, output = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                               batch["positions"], batch["image_ids"], x_t, t)
  return logits, output, x_t
