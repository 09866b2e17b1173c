"""Attention that skips the blocks the Transfusion mask hides: values and gradients equal the dense path's."""
import functools

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import masks
from tfusion.data import sequence
from tfusion.models import flash_attention, transformer
from tests.helpers import image_doc, packed_rows, text_doc

LAYOUT = sequence.RowLayout(seq_len=64, latent_shape=(4, 4, 3), patch_size=2)   # 4 patches per image


def packed_batch():
  """Two rows of 64: several documents with images in the first, a short document then padding in the second."""
  batch = packed_rows(LAYOUT, [
      [image_doc(LAYOUT, caption_first=True), text_doc(5), image_doc(LAYOUT, caption_first=False),
       [*image_doc(LAYOUT)[:2], *image_doc(LAYOUT, seed=1)[1:]], text_doc(20)],
      [text_doc(3), image_doc(LAYOUT), text_doc(9)],
  ])
  return jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["image_ids"])


def qkv(heads=2, head_dim=8):
  return [jax.random.normal(jax.random.key(i), (2, 64, heads, head_dim)) for i in range(3)]


def dense(q, k, v, segment_ids, image_ids, bidirectional=True):
  ids = (segment_ids, image_ids, jnp.arange(q.shape[1]))
  return transformer.dense_attention(q, k, v, ids, ids, bidirectional)


def assert_same_values_and_grads(attention, q, k, v, segment_ids, image_ids, bidirectional=True, atol=1e-5):
  """attention(q, k, v) and its gradients (of a random projection of the output) equal dense attention's."""
  weights = jax.random.normal(jax.random.key(9), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)  # noqa: E731
  reference = lambda q, k, v: dense(q, k, v, segment_ids, image_ids, bidirectional)  # noqa: E731
  np.testing.assert_allclose(attention(q, k, v), reference(q, k, v), atol=atol)
  got, want = (jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (attention, reference))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=atol)


@pytest.mark.parametrize("chunk, bidirectional", [(16, True), (16, False), (24, True)])
def test_block_skipping_attention_equals_dense(chunk, bidirectional):
  """Every chunk length (24 does not divide 64: the row is padded) and both image masks."""
  segment_ids, image_ids = packed_batch()
  attention = lambda q, k, v: transformer.block_skipping_attention(  # noqa: E731
      q, k, v, segment_ids, image_ids, chunk, bidirectional)
  assert_same_values_and_grads(jax.jit(attention), *qkv(), segment_ids, image_ids, bidirectional)


def test_block_skipping_attention_computes_the_visible_blocks_only():
  """At chunk 16 (4 x 4 block pairs) the two rows together see 7 blocks: the diagonal, and below it only
  the three blocks next to it (later documents do not see earlier ones, padding sees itself); the other
  9 block pairs, of which 3 are below the diagonal, are skipped forward and backward."""
  segment_ids, image_ids = packed_batch()
  mask = np.asarray(masks.transfusion_mask(segment_ids, image_ids))
  dense_count = mask.reshape(2, 4, 16, 4, 16).any(axis=(0, 2, 4)).sum()
  lo, hi = masks.key_block_ranges(segment_ids, masks.mask_positions(image_ids), 16)
  assert masks.visible_blocks(lo, hi).any(axis=0).sum() == dense_count == 7
  jaxpr = str(jax.make_jaxpr(lambda *a: transformer.block_skipping_attention(*a, 16))(*qkv(), segment_ids, image_ids))
  assert jaxpr.count("cond[") == 16                                    # one branch per block pair


def test_block_skipping_attention_gradient_recomputes_only_the_logits():
  """The backward pass is FlashAttention's: per block pair 2 matmuls forward (logits, probs x values) and 5
  backward (the logits again from the saved log-sum-exp, then dv, dp, dq, dk), each under its block's
  visibility cond. Differentiating the forward pass instead would rematerialise it whole: 2 + 2 + 4 = 8."""
  segment_ids, image_ids = packed_batch()
  loss = lambda *a: jnp.sum(transformer.block_skipping_attention(*a, segment_ids, image_ids, 16) ** 2)  # noqa: E731
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*qkv()))
  assert jaxpr.count("cond[") == 2 * 16
  assert jaxpr.count("dot_general[") == (2 + 5) * 16


@pytest.mark.parametrize("policy, attention_dots, saved", [("dots_saveable", 7, 2), ("full", 2 + 7, 0)])
def test_dots_saveable_keeps_the_attention_output_instead_of_recomputing_it(policy, attention_dots, saved, capsys):
  """A custom_vjp is opaque to the dots policy: without the name, a remat'd block reran the whole blockwise
  forward pass (2 more matmuls per block pair) for the residuals the backward pass needs. dots_saveable keeps
  the output and log-sum-exp; `full` keeps nothing and reruns it, as it should."""
  cfg = transformer.TransformerConfig(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, attention="chunked",
                                      attention_chunk=8)
  block = nn.remat(transformer.Block, policy=transformer.REMAT_POLICIES[policy])(cfg)
  x, ids = jnp.ones((2, 16, 16)), jnp.ones((2, 16), jnp.int32)
  params = block.init(jax.random.key(0), x, ids, ids * 0, ids)
  loss = lambda p, x: block.apply(p, x, ids, ids * 0, ids)[0].sum()  # noqa: E731
  jax.ad_checkpoint.print_saved_residuals(loss, params, x)
  assert capsys.readouterr().out.count(f"named '{transformer.ATTENTION_NAME}'") == saved
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert attention_block_dots(jaxpr.jaxpr) == attention_dots * 4      # 2 x 2 block pairs of 8


def attention_block_dots(jaxpr) -> int:
  """dot_generals of a (nested) jaxpr whose output is a [B=2, H=2, 8, ...] attention block."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      count += eqn.outvars[0].aval.shape[:3] == (2, 2, 8)
    count += sum(attention_block_dots(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
  return count


def long_packed_batch():
  """Two rows of 512 (16 patches per image): documents with images packed in the first, padding in the second."""
  layout = sequence.RowLayout(seq_len=512, latent_shape=(8, 8, 3), patch_size=2)
  batch = packed_rows(layout, [
      [image_doc(layout, caption_first=True), text_doc(100), image_doc(layout, caption_first=False), text_doc(150),
       image_doc(layout), text_doc(90)],
      [text_doc(40), image_doc(layout, caption_first=False), text_doc(200)],
  ])
  return jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["image_ids"])


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_flash_attention_kernel_equals_dense_in_interpret_mode(bidirectional):
  """The Pallas TPU kernels (forward, dk/dv, dq) run in interpret mode on CPU: 4 x 4 blocks of 128, one head."""
  segment_ids, image_ids = long_packed_batch()
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 512, 1, 32)) for i in range(3))
  attention = lambda q, k, v: flash_attention.flash_attention(  # noqa: E731
      q, k, v, segment_ids, image_ids, 128, bidirectional, interpret=True)
  assert_same_values_and_grads(jax.jit(attention), q, k, v, segment_ids, image_ids, bidirectional, atol=2e-5)


@pytest.mark.parametrize("policy, saved, kernels", [("dots_saveable", 2, 3), ("full", 0, 4)])
def test_dots_saveable_keeps_the_flash_kernels_output(policy, saved, kernels, capsys):
  """The same for the Pallas kernel: under dots_saveable its output and log-sum-exp are kept, and the program
  lowered for TPU runs 3 kernels (forward, dk/dv, dq), not the forward again in the backward pass."""
  segment_ids, image_ids = long_packed_batch()
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 512, 1, 128)) for i in range(3))

  def loss(q, k, v, interpret):
    attention = lambda q, k, v: flash_attention.flash_attention(  # noqa: E731
        q, k, v, segment_ids, image_ids, 128, interpret=interpret)
    return jnp.sum(jax.checkpoint(attention, policy=transformer.REMAT_POLICIES[policy])(q, k, v) ** 2)

  jax.ad_checkpoint.print_saved_residuals(functools.partial(loss, interpret=True), q, k, v)
  named = [line for line in capsys.readouterr().out.splitlines() if f"named '{flash_attention.OUTPUT_NAME}'" in line]
  assert len(named) == saved
  assert all(line.startswith(("bf16[2,1,512,128]", "f32[2,1,512,128]", "f32[2,1,512] ")) for line in named)
  assert sum(line.startswith("f32[2,1,512] ") for line in named) == saved // 2   # lse on one lane, not 128
  grad = jax.jit(jax.grad(functools.partial(loss, interpret=False), argnums=(0, 1, 2)))
  assert jax.export.export(grad, platforms=["tpu"])(q, k, v).mlir_module().count("tpu_custom_call") == kernels
