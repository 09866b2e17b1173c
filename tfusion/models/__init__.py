"""Flax Linen modules: transformer, patch encoders/decoders, the Transfusion model."""
