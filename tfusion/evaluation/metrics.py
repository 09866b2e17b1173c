"""Metrics with known answers: CIDEr-D for captions, the Frechet distance between Gaussians (FID), CLIP
score, and perplexity from summed token losses."""
import collections
import math
import re

import jax.numpy as jnp
import numpy as np

CIDER_SIGMA = 6.0       # CIDEr-D's length penalty exp(-(len(c) - len(r))^2 / (2 sigma^2))
CIDER_MAX_N = 4


def tokenize(text: str) -> list[str]:
  """Lower-cased words, punctuation dropped (as the COCO caption tokenizer does)."""
  return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str]) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, CIDER_MAX_N + 1)
                             for i in range(len(words) - n + 1))


def cider_d(candidates: list[str], references: list[list[str]]) -> tuple[float, np.ndarray]:
  """CIDEr-D (Vedantam et al. 2015, as in the COCO caption toolkit): (corpus score, per-caption scores).

  Each n-gram (n = 1..4) is weighted by tf x idf, with document frequencies over the reference sets of the
  whole corpus; a candidate's score is the mean over its references of the n-averaged cosine similarity
  with clipped candidate weights, times a Gaussian penalty on the length difference, times 10.
  """
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
  refs = [[_ngrams(tokenize(r)) for r in rs] for rs in references]
  document_frequency = collections.Counter(g for rs in refs for g in set().union(*rs))
  log_images = math.log(len(refs))

  def weights(counts):
    """(per-n weight dicts, per-n norms, length): the length counts bigrams, as the toolkit does."""
    vectors = [{} for _ in range(CIDER_MAX_N)]
    for gram, tf in counts.items():
      vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
    return vectors, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

  scores = []
  for candidate, ref_counts in zip(candidates, refs):
    vectors, norms, length = weights(_ngrams(tokenize(candidate)))
    total = np.zeros(CIDER_MAX_N)
    for counts in ref_counts:
      ref_vectors, ref_norms, ref_length = weights(counts)
      penalty = math.exp(-((length - ref_length) ** 2) / (2 * CIDER_SIGMA ** 2))
      for n in range(CIDER_MAX_N):
        dot = sum(min(w, ref_vectors[n].get(g, 0.0)) * ref_vectors[n].get(g, 0.0) for g, w in vectors[n].items())
        if norms[n] and ref_norms[n]:
          dot /= norms[n] * ref_norms[n]
        total[n] += dot * penalty
    scores.append(10.0 * total.mean() / len(ref_counts))
  scores = np.array(scores)
  return float(scores.mean()), scores


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the FID of two Gaussians (float64).

  tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2),
  which are those of S1 S2: two symmetric eigendecompositions, exact also for singular covariances (where a
  general matrix square root of S1 S2 fails or needs a regulariser)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} "
                     f"vs {sigma2.shape}")
  values, vectors = np.linalg.eigh(sigma1)
  root1 = (vectors * np.sqrt(np.maximum(values, 0))) @ vectors.T
  product = root1 @ sigma2 @ root1
  trace_root = np.sqrt(np.maximum(np.linalg.eigvalsh((product + product.T) / 2), 0)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def feature_frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
  """frechet_distance of the gaussian_statistics of features x [N, d] and y [M, d], computed from the samples:
  with centred A = x - mean, B = y - mean, S1 S2 = A^T A B^T B / ((N-1)(M-1)) has the nonzero eigenvalues of
  (A B^T)^T (A B^T) / ((N-1)(M-1)), so tr (S1 S2)^(1/2) is the sum of the singular values of A B^T over
  sqrt((N-1)(M-1)): an [N, M] problem instead of two [d, d] ones (64 images vs 2048 Inception features)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape[1:] != y.shape[1:] or x.ndim != 2 or min(len(x), len(y)) < 2:
    raise ValueError(f"need two feature sets [N >= 2, d] of one width: got {x.shape} and {y.shape}")
  a, b = x - x.mean(0), y - y.mean(0)
  scale = (len(x) - 1) * (len(y) - 1)
  trace_root = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt(scale)
  traces = (a * a).sum() / (len(x) - 1) + (b * b).sum() / (len(y) - 1)
  return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + traces - 2 * trace_root)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], covariance [d, d]) of features [N, d], the unbiased covariance as FID uses."""
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray, weight: float = 100.0) -> float:
  """Mean over pairs of weight x max(cos(image, text), 0) (Hessel et al. 2021 use w = 2.5; torchmetrics 100)."""
  a = np.asarray(image_embeddings, np.float64)
  b = np.asarray(text_embeddings, np.float64)
  cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return float(weight * np.maximum(cos, 0).mean())


def psnr(images, reconstructions):
  """Mean over images of the PSNR in dB of pixel values in [0, 255]: images, reconstructions [N, H, W, C] (numpy
  or traced)."""
  mse = jnp.mean(jnp.square(jnp.asarray(images, jnp.float32) - jnp.asarray(reconstructions, jnp.float32)),
                 axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10)))


def perplexity(loss_sum: float, tokens: int) -> float:
  """exp(summed cross-entropy / predicted tokens): token-level perplexity."""
  return math.exp(loss_sum / tokens)
