"""Recipes: whole workflows built on xcs_jax's primitives and optax.

- `xcs_jax.recipes.classify`: learn a text classifier from a small model's
  option log-probabilities and embeddings (`python -m xcs_jax.recipes.classify`).

Import a recipe's module by name (`from xcs_jax.recipes import classify`).
"""
