"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping (paper §4.1)."""
import jax
import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to final_lr_fraction * lr at total_steps."""
  lr = optim_config.lr
  warmup = min(optim_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=lr * optim_config.final_lr_fraction)


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only; not on norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=decay_mask))
  return tx, schedule
