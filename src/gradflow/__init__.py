"""gradflow: reinforcement-learning post-training for language models in JAX + equinox."""

__version__ = "0.1.0"
