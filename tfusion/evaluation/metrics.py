"""Metrics with known answers: CIDEr-D for captions, the Frechet distance between Gaussians (FID), CLIP
score, and perplexity from summed token losses."""
import collections
import math
import re

import numpy as np
from scipy import linalg

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
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the FID of two Gaussians (float64)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} "
                     f"vs {sigma2.shape}")
  root = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(root).all():   # a singular product: regularise both covariances
    eps = 1e-6 * np.eye(len(sigma1))
    root = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
  root = np.real(root)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


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


def perplexity(loss_sum: float, tokens: int) -> float:
  """exp(summed cross-entropy / predicted tokens): token-level perplexity."""
  return math.exp(loss_sum / tokens)
