"""tfusion: Transfusion (Zhou et al., 2024) pretraining in JAX/Flax."""


def load(path: str, mesh=None):
  """A ready generate.Sampler from an export directory written by python -m tfusion.export."""
  from tfusion import export  # pylint: disable=import-outside-toplevel  (import tfusion stays light)
  return export.load(path, mesh)
