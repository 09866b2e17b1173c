"""tfusion: Transfusion (Zhou et al., 2024) pretraining in JAX/Flax."""
