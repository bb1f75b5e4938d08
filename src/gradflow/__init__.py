"""gradflow: reinforcement-learning post-training for language models in JAX + equinox."""

from .xla_cpu import set_cpu_flags

set_cpu_flags()

__version__ = "0.1.0"
