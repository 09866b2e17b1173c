"""The einsum of an activation and a kernel (every linear layer of the transformer), with a weight gradient
laid out for XLA:CPU.

`contract("bld,dhk->blhk", x, kernel)`: x holds batch axes then the contracted axes, the kernel the
contracted axes then its output axes. The forward pass and the input gradient are plain einsums. The
kernel gradient contracts x and the output gradient over every batch axis; left to itself, XLA:CPU
feeds that contraction by writing the output gradient transposed from inside an elementwise fusion (e.g.
SwiGLU's backward), a strided write that cost 5-6% of the 0.16B CPU step. On CPU in float32, x is transposed
instead (contracted axes first), as a separate copy the compiler may not fold back into the dot: the
smaller array, a cache-friendly transpose, and one per layer input for every kernel fed by it. On
other platforms (TPU, GPU), whose matmul units take either layout, and for bfloat16 on CPU (measured
slower with the transpose), it is the plain einsum.
"""
import functools

import jax
from jax import ad_checkpoint
import jax.numpy as jnp


def _axes(spec: str) -> tuple[str, str, str, str]:
  """'bld,dhk->blhk' -> (x axes, kernel axes, output axes, x axes with the contracted ones first)."""
  inputs, y_axes = spec.split("->")
  x_axes, kernel_axes = inputs.split(",")
  contracted = "".join(a for a in x_axes if a in kernel_axes)
  batch = "".join(a for a in x_axes if a not in kernel_axes)
  if x_axes != batch + contracted or not kernel_axes.startswith(contracted) or y_axes != batch + kernel_axes[
      len(contracted):]:
    raise ValueError(f"contract needs 'batch+in,in+out->batch+out', got {spec!r}")
  return x_axes, kernel_axes, y_axes, contracted + batch


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def contract(spec: str, x, kernel):
  """einsum(spec, x, kernel) accumulated in float32 -> float32 (see the module docstring for the spec's form)."""
  return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)


def _contract_fwd(spec, x, kernel):
  return contract(spec, x, kernel), (x, kernel)


def _contract_bwd(spec, residuals, dy):
  x, kernel = residuals
  x_axes, kernel_axes, y_axes, transposed_axes = _axes(spec)
  dy = dy.astype(x.dtype)    # the cotangent of a value cast from x.dtype: exact in it
  dx = jnp.einsum(f"{y_axes},{kernel_axes}->{x_axes}", dy, kernel, preferred_element_type=jnp.float32)

  def kernel_grad(x_like, axes):
    return jnp.einsum(f"{axes},{y_axes}->{kernel_axes}", x_like, dy, preferred_element_type=jnp.float32)

  def on_cpu(x):
    transposed = jnp.transpose(x, [x_axes.index(a) for a in transposed_axes])
    return kernel_grad(jax.lax.optimization_barrier(transposed), transposed_axes)

  dkernel = jax.lax.platform_dependent(x, cpu=on_cpu, default=lambda x: kernel_grad(x, x_axes))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)

# The name contract's outputs carry for remat policies: a custom_vjp call is opaque to a policy that saves
# matmul outputs (dots_with_no_batch_dims_saveable), so a policy that should keep them names them.
OUTPUT_NAME = "contraction"


def project(spec: str, x, kernel):
  """contract(spec, x, kernel) in float32, the plain einsum otherwise (bfloat16 measured slower on CPU with
  the transpose), accumulated in float32; the output named OUTPUT_NAME for remat policies."""
  if x.dtype == jnp.float32:
    y = contract(spec, x, kernel)
  else:
    y = jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)
  return ad_checkpoint.checkpoint_name(y, OUTPUT_NAME)
