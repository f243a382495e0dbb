"""Evaluation: embedding collections and retrieval metrics."""
