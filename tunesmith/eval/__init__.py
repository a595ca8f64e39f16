"""Evaluation: generation, metrics, base-vs-tuned comparison and the HTML report."""
