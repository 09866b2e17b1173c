import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion


def test_cosine_alpha_bar_matches_closed_form():
  ab = diffusion.cosine_alpha_bar(1000)
  f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  assert ab.shape == (1001,) and ab[0] == 1.0
  for t in (1, 10, 250, 500, 750, 900):
    assert ab[t] == pytest.approx(f(t) / f(0), rel=1e-9)
  assert ab[500] == pytest.approx(0.49384, abs=1e-5)  # hand-computed anchor
  # Near the end the 0.999 clip on beta takes over from the closed form.
  assert 0 < ab[1000] < 1e-4 and np.all(np.diff(ab) < 0)


def test_linear_alpha_bar():
  ab = diffusion.linear_alpha_bar(1000)
  assert ab[1] == pytest.approx(1 - 1e-4)
  assert ab[1000] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_sample_timesteps_respects_caps_and_is_uniform():
  t_max = jnp.array([1000, 500, 1] * 20000).reshape(-1, 3)
  t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), t_max))
  assert t.min() >= 1 and (t <= np.asarray(t_max)).all()
  assert t[:, 1].max() == 500 and (t[:, 2] == 1).all()
  assert abs(t[:, 0].mean() - 500.5) < 5 and abs(t[:, 1].mean() - 250.5) < 3


def test_q_sample():
  x0, eps = jnp.ones((2, 3, 3)), jnp.full((2, 3, 3), 2.0)
  out = diffusion.q_sample(x0, eps, jnp.array([1.0, 0.25]))
  np.testing.assert_allclose(out[0], 1.0)
  np.testing.assert_allclose(out[1], 0.5 + math.sqrt(0.75) * 2, rtol=1e-6)


def test_respaced_timesteps():
  np.testing.assert_array_equal(diffusion.respaced_timesteps(1000, 4), [1000, 667, 334, 1, 0])
  ts = diffusion.respaced_timesteps(1000, 250)
  assert len(ts) == 251 and ts[0] == 1000 and ts[-2] == 1 and np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match="sampling steps"):
    diffusion.respaced_timesteps(1000, 0)


def test_ddpm_step_matches_posterior_formula():
  """Compare against q(x_{t-1} | x_t, x0) of Ho et al. eqs. 6-7, written out with betas."""
  ab = diffusion.cosine_alpha_bar(1000)
  rng = np.random.default_rng(0)
  x_t, eps_hat, noise = rng.standard_normal((3, 5)).astype(np.float32)
  t = 400
  beta_t = 1 - ab[t] / ab[t - 1]
  x0 = (x_t - np.sqrt(1 - ab[t]) * eps_hat) / np.sqrt(ab[t])
  mean = np.sqrt(ab[t - 1]) * beta_t / (1 - ab[t]) * x0 + np.sqrt(1 - beta_t) * (1 - ab[t - 1]) / (1 - ab[t]) * x_t
  var = (1 - ab[t - 1]) / (1 - ab[t]) * beta_t
  x0_hat = diffusion.x0_from_prediction("eps", eps_hat, x_t, ab[t])
  np.testing.assert_allclose(x0_hat, x0, rtol=1e-5)
  out = diffusion.ddpm_step(x_t, x0_hat, ab[t], ab[t - 1], noise)
  np.testing.assert_allclose(out, mean + np.sqrt(var) * noise, rtol=1e-5)
  # The last step returns the x0 estimate, with no noise.
  np.testing.assert_allclose(diffusion.ddpm_step(x_t, x0_hat, ab[t], 1.0, noise), x0, rtol=1e-5)
  np.testing.assert_allclose(diffusion.x0_from_prediction("eps", eps_hat, x_t, ab[t], clip_x0=0.5),
                             np.clip(x0, -0.5, 0.5), rtol=1e-5)


def test_respaced_ddpm_chain_with_exact_eps_recovers_x0():
  """With the true noise as prediction, 50 respaced ancestral steps land on x0."""
  ab = diffusion.cosine_alpha_bar(1000)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
  x = rng.standard_normal((4, 4)).astype(np.float32)
  ts = diffusion.respaced_timesteps(1000, 50)
  for i in range(len(ts) - 1):
    eps = (x - np.sqrt(ab[ts[i]]) * x0) / np.sqrt(1 - ab[ts[i]])
    x0_hat = diffusion.x0_from_prediction("eps", eps, x, ab[ts[i]], clip_x0=1.0)
    x = np.asarray(diffusion.ddpm_step(x, x0_hat, ab[ts[i]], ab[ts[i + 1]],
                                       rng.standard_normal((4, 4)).astype(np.float32)))
  np.testing.assert_allclose(x, x0, atol=1e-5)


def random_step_inputs(seed=0):
  """x_t, eps_hat, its x0 estimate, noise at t = 600, and alpha_bar at 600 and 400."""
  rng = np.random.default_rng(seed)
  x_t, eps_hat, noise = (jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32) for _ in range(3))
  alpha_bar = diffusion.cosine_alpha_bar(1000)
  a_t = jnp.float32(alpha_bar[600])
  x0_hat = diffusion.x0_from_prediction("eps", eps_hat, x_t, a_t)
  return x_t, eps_hat, x0_hat, noise, a_t, jnp.float32(alpha_bar[400])


def test_ddim_with_eta_1_is_the_ddpm_step():
  x_t, _, x0_hat, noise, a_t, a_prev = random_step_inputs()
  np.testing.assert_allclose(diffusion.ddim_step(x_t, x0_hat, a_t, a_prev, noise, eta=1.0),
                             diffusion.ddpm_step(x_t, x0_hat, a_t, a_prev, noise), atol=1e-5)


def test_ddim_with_eta_0_is_deterministic_and_keeps_x0_and_eps():
  x_t, eps_hat, x0_hat, noise, a_t, a_prev = random_step_inputs()
  x_prev = diffusion.ddim_step(x_t, x0_hat, a_t, a_prev, noise, eta=0.0)
  np.testing.assert_array_equal(x_prev, diffusion.ddim_step(x_t, x0_hat, a_t, a_prev, 5 * noise, eta=0.0))
  # Song et al. eq. 12 with sigma = 0: same x0 estimate and same noise direction at t_prev.
  x0 = (x_t - jnp.sqrt(1 - a_t) * eps_hat) / jnp.sqrt(a_t)
  np.testing.assert_allclose(x_prev, jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps_hat, atol=1e-5)
  # To t_prev = 0 it returns the x0 estimate.
  np.testing.assert_allclose(diffusion.ddim_step(x_t, x0_hat, a_t, jnp.float32(1.0), noise, eta=0.0), x0,
                             atol=1e-5)


def test_x0_from_v_is_exact_where_alpha_bar_vanishes():
  """At t = 1000 (alpha_bar 2.4e-9) the x0 estimate of the exact v is x0 to float32 rounding, and an error
  in v reaches x0 scaled by sqrt(1 - a) (1 here), where the eps route would multiply it by 2e4."""
  alpha_bar = diffusion.cosine_alpha_bar(1000)[-1]
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32) for _ in range(2))
  a = jnp.full(2, alpha_bar, jnp.float32)
  x_t = diffusion.q_sample(x0, eps, a)
  v = diffusion.prediction_target("v", x0, eps, a)
  np.testing.assert_allclose(diffusion.x0_from_prediction("v", v, x_t, a), x0, atol=1e-6)
  np.testing.assert_allclose(diffusion.x0_from_prediction("v", v + 0.01, x_t, a) - x0, -0.01, atol=1e-6)
  eps_route = diffusion.x0_from_prediction("eps", diffusion.eps_from_prediction("v", v, x_t, a), x_t, a)
  assert float(jnp.abs(eps_route - x0).max()) > 1e-4       # the precision the direct formula keeps


def test_classifier_free_guidance():
  cond, uncond = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
  np.testing.assert_array_equal(diffusion.guide(cond, uncond, 1.0), cond)
  np.testing.assert_array_equal(diffusion.guide(cond, uncond, 0.0), uncond)
  np.testing.assert_allclose(diffusion.guide(cond, uncond, 3.0), [2.0, 8.0])


def test_v_target_and_its_eps_estimate():
  """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho eq. 2); the exact v gives back the exact eps, and an error
  in v reaches eps scaled by sqrt(a) (so not at all as alpha_bar -> 0)."""
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32) for _ in range(2))
  a = jnp.array([0.9, 1e-6], jnp.float32)
  v = diffusion.prediction_target("v", x0, eps, a)
  np.testing.assert_allclose(v[0], np.sqrt(0.9) * eps[0] - np.sqrt(0.1) * x0[0], rtol=1e-6)
  x_t = diffusion.q_sample(x0, eps, a)
  np.testing.assert_allclose(diffusion.eps_from_prediction("v", v, x_t, a), eps, atol=1e-5)
  error = diffusion.eps_from_prediction("v", v + 1.0, x_t, a) - eps
  np.testing.assert_allclose(error[0], np.sqrt(0.9), rtol=1e-5)
  np.testing.assert_allclose(error[1], 1e-3, rtol=1e-3)
  # eps prediction is the identity both ways.
  assert diffusion.prediction_target("eps", x0, eps, a) is eps
  assert diffusion.eps_from_prediction("eps", x0, x_t, a) is x0


def test_min_snr_weights():
  a = jnp.array([0.5, 0.9, 0.99])                    # SNR 1, 9, 99
  np.testing.assert_array_equal(diffusion.loss_weights("eps", a, 0.0), [1, 1, 1])
  np.testing.assert_allclose(diffusion.loss_weights("eps", a, 5.0), [1, 5 / 9, 5 / 99], rtol=1e-4)
  np.testing.assert_allclose(diffusion.loss_weights("v", a, 5.0), [1 / 2, 5 / 10, 5 / 100], rtol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction,clip_x0", [("eps", 1.0), ("eps", 6.0), ("v", None), ("v", 6.0)])
def test_default_chain_bounds_the_amplification_of_prediction_errors(sampler, prediction, clip_x0):
  """At every step of the 250-step chain, an error of 0.1 per element in the model's output moves x_prev by at
  most 0.1 (RMS): v outputs by construction, eps outputs with x0 clipped to the codec's range (pixels 1, latents
  their measured range). Without the clip, eps errors at the first step (alpha_bar 2.4e-9 -> 3.9e-5) are
  amplified about 127 times."""
  ab = diffusion.cosine_alpha_bar(1000)
  ts = diffusion.respaced_timesteps(1000, 250)
  rng = np.random.default_rng(0)

  def amplification(i, clip):
    t, t_prev = ts[i], ts[i + 1]
    x0 = rng.uniform(-1, 1, (16, 48)).astype(np.float32)
    eps, noise, error = (rng.standard_normal((16, 48)).astype(np.float32) for _ in range(3))
    a = jnp.full(16, ab[t], jnp.float32)
    x_t = diffusion.q_sample(x0, eps, a)
    output = diffusion.prediction_target(prediction, x0, eps, a)

    def step(out):
      x0_hat = diffusion.x0_from_prediction(prediction, out, x_t, a, clip)
      if sampler == "ddpm":
        return diffusion.ddpm_step(x_t, x0_hat, ab[t], ab[t_prev], noise)
      return diffusion.ddim_step(x_t, x0_hat, ab[t], ab[t_prev], noise, 0.0)
    return float(jnp.sqrt(jnp.mean(jnp.square(step(output + 0.1 * error) - step(output))))) / 0.1

  assert max(amplification(i, clip_x0) for i in range(len(ts) - 1)) < 1.0
  if prediction == "eps":
    assert amplification(0, None) > 100
