"""Test set-up: 8 fake CPU devices (before jax is imported) and parsed absl flags."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

# grain worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
