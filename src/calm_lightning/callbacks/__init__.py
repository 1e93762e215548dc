"""Callbacks own the side products of training: samples, figures, summaries."""
