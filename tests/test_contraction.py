"""contraction.project, the einsum of every linear layer: einsum's values and gradients, a kernel gradient laid out
for XLA:CPU only on CPU, and outputs that the dots_saveable remat policy keeps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion.models import contraction, transformer

SPECS = [("bld,dhk->blhk", (2, 5, 6), (6, 3, 4)), ("blhk,hkd->bld", (2, 5, 3, 4), (3, 4, 6)),
         ("bld,dv->blv", (2, 5, 6), (6, 7))]


@pytest.mark.parametrize("spec, x_shape, kernel_shape", SPECS)
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_equal_the_einsums(spec, x_shape, kernel_shape, dtype, rtol):
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape).astype(dtype)
  out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, kernel)).shape
  weights = jax.random.normal(jax.random.key(2), out_shape)
  reference = lambda x, k: jnp.einsum(spec, x, k, preferred_element_type=jnp.float32)  # noqa: E731
  loss = lambda f: lambda x, k: jnp.sum(f(x, k).astype(dtype).astype(jnp.float32) * weights)  # noqa: E731
  # contract itself, the custom gradient (project sends bfloat16 to the plain einsum)
  project = lambda x, k: contraction.contract(spec, x, k)  # noqa: E731
  np.testing.assert_allclose(jax.jit(project)(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(loss(project), (0, 1)))(x, kernel)
  want = jax.jit(jax.grad(loss(reference), (0, 1)))(x, kernel)
  for g, w in zip(got, want):
    assert g.dtype == dtype and g.shape == w.shape
    np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=rtol, atol=rtol / 10)


def test_only_the_cpu_program_transposes_the_input_for_the_kernel_gradient():
  """The kernel gradient contracts a materialised transpose of x (kept by an optimization barrier) when
  lowered for CPU in float32, and x itself for TPU and GPU, and for bfloat16."""
  grad = jax.jit(jax.grad(lambda x, k: contraction.project("bld,dm->blm", x, k).sum(), (0, 1)))
  args = jnp.ones((2, 4, 3)), jnp.ones((3, 5))
  text = {p: jax.export.export(grad, platforms=[p])(*args).mlir_module() for p in ("cpu", "tpu", "cuda")}
  assert "optimization_barrier" in text["cpu"] and "stablehlo.transpose" in text["cpu"]
  for platform in ("tpu", "cuda"):
    assert "optimization_barrier" not in text[platform] and "stablehlo.transpose" not in text[platform]
  assert all(t.count("stablehlo.dot_general") == 2 for t in text.values())   # the input and kernel gradients
  bfloat16 = jax.export.export(grad, platforms=["cpu"])(*(a.astype(jnp.bfloat16) for a in args)).mlir_module()
  assert "optimization_barrier" not in bfloat16       # measured slower on CPU with the transpose


def test_dots_saveable_keeps_every_linear_layers_output(capsys):
  """A custom_vjp is opaque to the dots policy; the name lets dots_saveable keep the block's six projections
  (q, k, v, out, gate, up; down's output is the block's) instead of recomputing the whole block."""
  cfg = transformer.TransformerConfig(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, attention="chunked",
                                      attention_chunk=8)
  block = nn.remat(transformer.Block, policy=transformer.REMAT_POLICIES["dots_saveable"])(cfg)
  x, ids = jnp.ones((2, 16, 16)), jnp.ones((2, 16), jnp.int32)
  params = block.init(jax.random.key(0), x, ids, ids * 0, ids)
  jax.ad_checkpoint.print_saved_residuals(lambda p, x: block.apply(p, x, ids, ids * 0, ids)[0].sum(), params, x)
  saved = capsys.readouterr().out
  assert saved.count(f"named '{contraction.OUTPUT_NAME}'") == 6, saved


def test_a_spec_of_another_form_is_refused():
  with pytest.raises(ValueError, match="bld,ld->bd"):
    jax.grad(lambda x, k: contraction.project("bld,ld->bd", x, k).sum())(jnp.ones((2, 3, 4)), jnp.ones((3, 4)))
