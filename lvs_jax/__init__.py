"""lvs_jax: representation-level safety audits of language models in JAX."""

__version__ = "0.1.0"
