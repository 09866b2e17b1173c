"""DDPM pieces: noise schedules, forward noising, timestep sampling, the ancestral (DDPM) and DDIM
reverse steps and classifier-free guidance.

Timestep convention: integer t in [0, T]. t = 0 is the clean image (alpha_bar = 1); training draws
t uniformly in [1, t_max] per image; t = T is (almost) pure noise. `alpha_bar` arrays therefore have
T + 1 entries and are indexed directly by t.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")   # what the patch decoder outputs (see prediction_target)
SAMPLERS = ("ddpm", "ddim")   # ancestral (ddpm_step) | ddim_step


def cosine_alpha_bar(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """IDDPM cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = f(t) / f(0), betas clipped.

  Returns: [T + 1] float64, alpha_bar[0] = 1.
  """
  def f(t):
    return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

  betas = np.array([min(1 - f(t) / f(t - 1), max_beta) for t in range(1, num_timesteps + 1)])
  return np.concatenate([[1.0], np.cumprod(1 - betas)])


def linear_alpha_bar(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM linear-beta schedule (Ho et al. 2020), for ablations. Returns: [T + 1] float64."""
  betas = np.linspace(beta_start, beta_end, num_timesteps)
  return np.concatenate([[1.0], np.cumprod(1 - betas)])


def make_alpha_bar(schedule: str, num_timesteps: int) -> np.ndarray:
  """alpha_bar [T + 1] for a schedule named in SCHEDULES."""
  if schedule == "cosine":
    return cosine_alpha_bar(num_timesteps)
  if schedule == "linear":
    return linear_alpha_bar(num_timesteps)
  raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}")


def sample_timesteps(key: jax.Array, t_max: jax.Array) -> jax.Array:
  """One timestep per image, uniform on {1, ..., t_max}.  t_max: [...] int -> [...] int32."""
  u = jax.random.uniform(key, t_max.shape)
  return jnp.minimum(jnp.floor(u * t_max).astype(jnp.int32) + 1, t_max)


def _per_image(alpha_bar_t, x):
  """alpha_bar_t [N] (or a scalar) broadcast against x [N, ...]."""
  alpha_bar_t = jnp.asarray(alpha_bar_t)
  return alpha_bar_t.reshape(alpha_bar_t.shape + (1,) * (x.ndim - alpha_bar_t.ndim)).astype(x.dtype)


def q_sample(x0: jax.Array, eps: jax.Array, alpha_bar_t: jax.Array) -> jax.Array:
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.  x0, eps: [N, ...]; alpha_bar_t: [N]."""
  a = _per_image(alpha_bar_t, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps


def prediction_target(prediction: str, x0, eps, alpha_bar_t):
  """What the patch decoder learns to output, by its MSE: eps (the paper) or the velocity
  v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022). x0, eps: [N, ...]; alpha_bar_t: [N]."""
  if prediction == "eps":
    return eps
  a = _per_image(alpha_bar_t, x0)
  return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0


def eps_from_prediction(prediction: str, output, x_t, alpha_bar_t):
  """The eps estimate of a decoder output: itself, or sqrt(a_t) v + sqrt(1 - a_t) x_t for v.

  With v, eps_hat -> x_t as alpha_bar -> 0 whatever the network outputs, so the near-pure-noise
  steps need no exact copy of x_t through the transformer. output, x_t: [N, ...]; alpha_bar_t: [N].
  """
  if prediction == "eps":
    return output
  a = _per_image(alpha_bar_t, x_t)
  return jnp.sqrt(a) * output + jnp.sqrt(1 - a) * x_t


def loss_weights(prediction: str, alpha_bar_t, min_snr_gamma: float):
  """Per-image weights of the decoder MSE: 1, or Min-SNR-gamma (Hang et al. 2023), which weights every
  t like an x0 loss capped at SNR = gamma: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1)
  for v. alpha_bar_t: [...] -> [...] float32; gamma 0 = off."""
  if not min_snr_gamma:
    return jnp.ones_like(alpha_bar_t, jnp.float32)
  snr = alpha_bar_t / (1 - alpha_bar_t)
  return jnp.minimum(snr, min_snr_gamma) / (snr if prediction == "eps" else snr + 1)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced sampling timesteps T = t_1 > ... > t_K >= 1, followed by 0.  Returns [K + 1] int32."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"number of sampling steps must be in [1, {num_timesteps}], got {num_steps}")
  ts = np.round(np.linspace(num_timesteps, 1, num_steps)).astype(np.int32)
  return np.concatenate([ts, [0]]).astype(np.int32)


def x0_from_prediction(prediction: str, output, x_t, alpha_bar_t, clip_x0: float | None = None):
  """The x0 estimate of a decoder output, clipped to [-clip_x0, clip_x0] (the codec's range) if given.

  eps: (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), which multiplies an eps error by sqrt((1 - a_t) / a_t)
  (2e4 at t = 1000: the clip is what keeps the first steps sane). v: sqrt(a_t) x_t - sqrt(1 - a_t) v,
  with no division, so exact in float32 down to alpha_bar ~ 1e-9 (converting v to eps and back would
  lose ulp(x_t) / sqrt(a_t) ~ 1e-3). output, x_t: [N, ...]; alpha_bar_t: scalar or [N].
  """
  a = _per_image(alpha_bar_t, x_t)
  if prediction == "eps":
    x0_hat = (x_t - jnp.sqrt(1 - a) * output) / jnp.sqrt(a)
  else:
    x0_hat = jnp.sqrt(a) * x_t - jnp.sqrt(1 - a) * output
  return x0_hat if clip_x0 is None else jnp.clip(x0_hat, -clip_x0, clip_x0)


def ddpm_step(x_t, x0_hat, alpha_bar_t, alpha_bar_prev, noise):
  """One ancestral DDPM step from t to an earlier t_prev (respaced): a sample of q(x_prev | x_t, x0_hat).

  With respacing the effective beta is 1 - alpha_bar_t / alpha_bar_prev; the variance is the
  posterior one (beta_tilde). When t_prev = 0 (alpha_bar_prev = 1) the variance is 0 and the
  result is x0_hat. x_t, x0_hat, noise: [N, ...]; alpha_bar_*: scalars.
  """
  beta = 1 - alpha_bar_t / alpha_bar_prev
  mean = (jnp.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t)) * x0_hat + (
      jnp.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
  var = beta * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
  return mean + jnp.sqrt(var) * noise


def ddim_step(x_t, x0_hat, alpha_bar_t, alpha_bar_prev, noise, eta: float):
  """One DDIM step from t to an earlier t_prev (Song et al. 2021, eq. 12), the noise direction being
  the eps implied by x0_hat (so a clipped x0 stays consistent with it).

  eta = 0 is deterministic (noise unused); eta = 1 has the DDPM posterior variance and equals
  ddpm_step. x_t, x0_hat, noise: [N, ...]; alpha_bar_*: scalars.
  """
  eps_hat = (x_t - jnp.sqrt(alpha_bar_t) * x0_hat) / jnp.sqrt(1 - alpha_bar_t)
  sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
  direction = jnp.sqrt(jnp.maximum(1 - alpha_bar_prev - sigma**2, 0.0)) * eps_hat
  return jnp.sqrt(alpha_bar_prev) * x0_hat + direction + sigma * noise


def guide(conditional, unconditional, scale: float):
  """Classifier-free guidance: u + scale (c - u) on the decoder outputs (eps or v: both are affine in
  eps given x_t, so guiding either is guiding eps); scale 1 is the conditional prediction."""
  return unconditional + scale * (conditional - unconditional)
