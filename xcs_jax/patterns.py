"""Ensemble building blocks: samples, majority vote, judge."""
from xcs_jax._src.patterns import ensemble
from xcs_jax._src.patterns import judge
from xcs_jax._src.patterns import majority_vote
from xcs_jax._src.patterns import normalize_answers

__all__ = ["ensemble", "judge", "majority_vote", "normalize_answers"]
