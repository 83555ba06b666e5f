"""Inference: the one Predictor and the modes built on it."""
