"""Experiment configuration: typed schema (`schema`) and the strict YAML/override loader (`loader`)."""
