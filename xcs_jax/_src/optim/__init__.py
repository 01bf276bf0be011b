"""Optimization on top of optax: steps, data, loops, checkpoints, REINFORCE."""
