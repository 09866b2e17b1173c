"""A plain Llama train step: the reference tfusion's TPU estimates are compared with.

Text only, a causal mask, the layers written out one by one (no scan, so XLA's cost analysis sees
every layer). Attention is a dense einsum (`attention="dense"`) or tfusion's Pallas kernel on one
segment without images (`"flash"`, i.e. plain causal flash attention). Everything else is tfusion's,
so the comparison isolates what Transfusion adds: the same logical axis names and sharding rules,
the same AdamW (tfusion's optimizer), the same dtypes and per-layer remat policy, the same batch
sharding. Unrolled layers keep their remat (`prevent_cse`), as the scanned layers that train do.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import sharding
from tfusion.models.transformer import (REMAT_POLICIES, RMSNorm, SwiGLU, TransformerConfig, _projection,
                                       apply_rope, sharded_flash_attention)
from tfusion.training import state as state_lib


class CausalAttention(nn.Module):
  """x: [B, L, D] -> [B, L, D]; softmax over the keys at or before each query, in float32."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    shape, axes = (cfg.d_model, cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv")
    q, k, v = (_projection(cfg, name, "bld,dhk->blhk", shape, axes)(x) for name in ("query", "key", "value"))
    positions = jnp.arange(x.shape[1])[None]
    q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
    if cfg.attention == "flash":            # one segment, no images: the kernel's mask is plain causal
      ids = jnp.ones(x.shape[:2], jnp.int32)
      out = sharded_flash_attention(cfg, q, k, v, ids, jnp.zeros_like(ids))
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(cfg.head_dim)
      causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
      probs = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(cfg.dtype)
    return _projection(cfg, "out", "blhk,hkd->bld", (cfg.num_heads, cfg.head_dim, cfg.d_model),
                       ("heads", "kv", "embed"), fan_in_axes=(0, 1))(out)


class Layer(nn.Module):
  """Pre-norm residual block.  x: [B, L, D] -> [B, L, D]."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    norm = lambda name: RMSNorm(self.cfg.norm_eps, self.cfg.dtype, self.cfg.param_dtype, name=name)  # noqa: E731
    x = x + CausalAttention(self.cfg, name="attention")(norm("attention_norm")(x))
    x = x + SwiGLU(self.cfg, name="mlp")(norm("mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class PlainLlama(nn.Module):
  """tokens [B, L] int -> logits [B, L, V] float32. The layers are written out one by one, or with
  scan_layers in a loop (as trained: what its peak memory is read from)."""
  cfg: TransformerConfig
  vocab_size: int
  scan_layers: bool = False

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (self.vocab_size, cfg.d_model), cfg.param_dtype)
    x = jnp.take(nn.with_logical_constraint(table.astype(cfg.dtype), ("vocab", None)), tokens, axis=0)
    # Unrolled, prevent_cse keeps XLA from merging the recomputed forward into the first one (no remat at all).
    layer = Layer if cfg.remat_policy == "none" else nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat_policy],
                                                               prevent_cse=not self.scan_layers)
    if self.scan_layers:
      scan = nn.scan(lambda module, x, _: (module(x), None), variable_axes={"params": 0}, split_rngs={"params": True},
                     length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scan(layer(cfg, name="layers"), x, None)
    else:
      for i in range(cfg.num_layers):
        x = layer(cfg, name=f"layer_{i}")(x)
    x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    logits = _projection(cfg, "lm_head", "bld,dv->blv", (cfg.d_model, self.vocab_size), ("embed", "vocab"))(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))


def train_step(state: state_lib.TrainState, tokens, *, model, tx):
  """One AdamW step on the mean next-token cross entropy of tokens [B, L]."""
  def loss_fn(params):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), loss


def compile_train_step(model: PlainLlama, tx, batch_size: int, seq_len: int, mesh):
  """AOT-compile the step for `mesh` (parameters laid out by tfusion's rules, rows split over data and
  fsdp) from abstract values -> the compiled executable."""
  def init(key):
    params = model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  state, shardings = sharding.abstract_init(init, mesh)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def run(state, tokens):
    with nn.logical_axis_rules(sharding.RULES):
      return train_step(state, tokens, model=model, tx=tx)

  step = jax.jit(run, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  with jax.set_mesh(mesh):
    return step.lower(state, tokens).compile()
