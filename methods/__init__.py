"""Unlearning algorithms and model merging."""
