"""Datasets and on-device task samplers."""
