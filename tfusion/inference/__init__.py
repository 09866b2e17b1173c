"""Inference: mixed-modal decoding (decoding.py) and the Sampler with its loaders (sampler.py)."""
