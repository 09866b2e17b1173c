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


DECAYED = ("kernel", "embedding")   # the names of the params weight decay applies to


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only; not on norm scales or biases: True on the leaves named
  `kernel` (dense and conv, incl. the U-Net's 1x1 convs and the zero-initialised adaLN-Zero `modulation` and
  `skip_gain`, which are matrices too) or `embedding` (the token table), whatever their ndim.

  By name, not ndim: the scanned layers store their RMSNorm scales (and QK-norm's) stacked, [layers, D]. The other
  leaves (`scale` of RMSNorm / LayerNorm, `bias`) are not decayed. A leaf's name is the last dict key on its path,
  so a boxed (nn.Partitioned) tree gets the mask of its values.
  """
  def decayed(path, _):
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1] in DECAYED
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=decay_mask))
  return tx, schedule
