"""Vector quantiser of the VQ-VAE (van den Oord et al. 2017; Esser et al. 2021), the Chameleon baseline's image
tokenizer (Transfusion §4.1, App. A: 16,384 codes of 8 dims).

Each latent vector z_e [D] is replaced by its nearest code (L2) in a codebook [K, D]; the decoder sees
z_e + sg[e - z_e] (straight-through: the value of e, the gradient of z_e). The codebook is learned by the loss
(no EMA), the paper's formula with the mean-over-elements reduction of Esser et al.'s code:

  L_codebook = mean ||sg[z_e] - e||^2 + beta mean ||z_e - sg[e]||^2          (beta = 0.25)

The first term moves the codes to the encoder outputs, the second keeps the encoder near its codes; forward, the
second is beta times the first. Against dead codes, codes chosen by no batch over the last `after` steps are
restarted at encoder outputs of the current batch drawn at random (restart_unused; as in Dhariwal et al. 2020,
Jukebox): the per-code age is train state, so the restart is pure and jitted with the step.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

CODEBOOK_AXES = ("vq_codes", "vq_dim")
CODE_CHUNK = 4096   # codes searched at a time: nearest_codes holds [positions, CODE_CHUNK] distances, not all K


def nearest_codes(z, codebook, chunk: int = CODE_CHUNK):
  """Index of the nearest code (L2; the lowest index on a tie): z [..., D], codebook [K, D] -> int32 [...].

  A scan over blocks of `chunk` codes (the last padded, its padding never chosen) keeps the running minimum
  distance and its index; a later block takes over only when strictly nearer, so ties go to the lowest index as
  with one argmin over all K. No gradient flows through the search.
  """
  z, codebook = jax.lax.stop_gradient(z), jax.lax.stop_gradient(codebook)
  k, dim = codebook.shape
  chunk = min(chunk, k)
  blocks = -(-k // chunk)
  padded = jnp.pad(codebook, ((0, blocks * chunk - k), (0, 0))).reshape(blocks, chunk, dim)
  z_sq = jnp.sum(jnp.square(z), -1, keepdims=True)

  def search(best, block):
    best_distance, best_index = best
    codes, start = block
    distances = z_sq - 2 * jnp.einsum("...d,kd->...k", z, codes, precision=jax.lax.Precision.HIGHEST) + jnp.sum(
        jnp.square(codes), -1)
    distances = jnp.where(start + jnp.arange(chunk) < k, distances, jnp.inf)
    nearest, distance = jnp.argmin(distances, axis=-1), jnp.min(distances, axis=-1)
    nearer = distance < best_distance
    return (jnp.where(nearer, distance, best_distance), jnp.where(nearer, start + nearest, best_index)), None

  dtype = jnp.result_type(z, codebook)
  best = jnp.full(z.shape[:-1], jnp.inf, dtype), jnp.zeros(z.shape[:-1], jnp.int32)
  (_, index), _ = jax.lax.scan(search, best, (padded, jnp.arange(0, blocks * chunk, chunk, dtype=jnp.int32)))
  return index


def straight_through(z_e, z_q):
  """The value of z_q with the gradient of z_e (identity to z_e, none to z_q): [..., D] -> [..., D]."""
  return z_e + jax.lax.stop_gradient(z_q - z_e)


def vq_losses(z_e, z_q, beta: float):
  """(codebook, commitment) terms, means over all elements of z_e, z_q [..., D]: mean (sg[z_e] - z_q)^2, which
  trains the codes, and beta mean (z_e - sg[z_q])^2, which trains the encoder."""
  codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
  commitment = beta * jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
  return codebook, commitment


def code_counts(codes, codebook_size: int):
  """How often each code was chosen: codes int [...] -> int32 [codebook_size]."""
  return jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.int32)


def usage_and_perplexity(counts):
  """(fraction of codes used, exp of the entropy of the code histogram) of counts [K]; perplexity is K when all
  codes are used equally often, 1 when one code takes everything."""
  p = counts / jnp.sum(counts)
  return jnp.mean(counts > 0), jnp.exp(jnp.sum(jax.scipy.special.entr(p)))


def restart_unused(codebook, age, counts, z_e, key, after: int):
  """Dead-code restart after a batch: (codebook [K, D], age [K], fraction of codes used in the last `after`
  batches).

  age [K] int32: batches since each code was last chosen, before this one; counts [K]: this batch's histogram;
  z_e [N, D]: this batch's encoder outputs. A chosen code's age becomes 0, the others' grows by 1; a code whose
  age reaches `after` is replaced by a row of z_e drawn uniformly (with replacement) and its age starts again at 0.
  """
  age = jnp.where(counts > 0, 0, age + 1)
  dead = age >= after
  rows = jax.random.randint(key, (codebook.shape[0],), 0, z_e.shape[0])
  codebook = jnp.where(dead[:, None], jax.lax.stop_gradient(z_e[rows]).astype(codebook.dtype), codebook)
  return codebook, jnp.where(dead, 0, age), 1.0 - jnp.mean(dead)


class VectorQuantizer(nn.Module):
  """The codebook `embedding` [codebook_size, dim] (diffusers VQModel's quantize.embedding), initialised
  U(-1/K, 1/K) as in taming-transformers.

  __call__: z_e [..., dim] -> (z_q [..., dim], the nearest codes, differentiable in the codebook; codes int32 [...]).
  """
  codebook_size: int
  dim: int

  def setup(self):
    k = self.codebook_size

    def uniform(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)

    self.embedding = self.param("embedding", nn.with_logical_partitioning(uniform, CODEBOOK_AXES),
                                (k, self.dim))

  def embed(self, codes):
    """codes int [...] -> code vectors [..., dim]."""
    return jnp.take(self.embedding, codes, axis=0)

  def __call__(self, z_e):
    codes = nearest_codes(z_e, self.embedding)
    return self.embed(codes), codes
