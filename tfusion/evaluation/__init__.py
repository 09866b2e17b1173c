"""Evaluation: the held-out suite (suite.py), its metrics, the shapes checker and the scoring networks."""
