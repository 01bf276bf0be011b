"""Ensemble building blocks: ensemble, majority_vote, judge (on `fake`)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import xcs_jax
from xcs_jax import patterns, text

from conftest import unique_binding


def test_ensemble_is_one_batched_call_with_one_key_per_sample():
  sampler = unique_binding("fake:choice", choices=("a", "b", "c", "d"), output_bytes=8)
  q = text.encode("question", 16)
  key = jax.random.key(0)
  out = patterns.ensemble(sampler, q, n=12, key=key)
  assert out.shape == (12, 8)
  answers = text.decode(out)
  assert len(set(answers)) > 1                      # independent samples
  again = text.decode(patterns.ensemble(sampler, q, n=12, key=key))
  assert answers == again                           # same key, same answers
  jaxpr = jax.make_jaxpr(lambda q, k: patterns.ensemble(sampler, q, n=12, key=k))(q, key)
  assert [e.primitive.name for e in jaxpr.eqns].count("xcs_generate") == 1


def test_majority_vote_normalizes_and_breaks_ties_to_the_first():
  answers = text.encode(["Paris.", " paris", "Lyon", "PARIS!", "Lyon"], 12)
  assert text.decode(patterns.majority_vote(answers)) == "Paris."
  tie = text.encode(["b", "a", "a", "b"], 4)
  assert text.decode(patterns.majority_vote(tie)) == "b"
  batched = text.encode([["x", "y"], ["y", "y"], ["x", "z"]], 4)   # [n=3, batch=2, L]
  assert text.decode(patterns.majority_vote(batched)) == ["x", "y"]
  with pytest.raises(TypeError, match="answers"):
    patterns.majority_vote(text.encode("one", 4))


def test_normalize_answers():
  got = text.decode(patterns.normalize_answers(text.encode(["  Paris. ", "PARIS!", "", "a b"], 12)))
  assert got == ["paris", "paris", "", "a b"]


def test_judge_sees_the_question_and_every_candidate():
  judge = unique_binding("fake:echo", output_bytes=512)
  q = text.encode("What is 2+2?", 32)
  answers = text.encode(["4", "four", "5"], 8)
  prompt = text.decode(patterns.judge(judge, q, answers))
  assert "What is 2+2?" in prompt
  assert "1. 4" in prompt and "2. four" in prompt and "3. 5" in prompt
  with pytest.raises(TypeError, match="judge"):
    patterns.judge(judge, text.encode(["a", "b"], 8), answers)


def test_pipeline_under_xcs_jit_matches_jax_jit():
  sampler = unique_binding("fake:choice", choices=("Paris", "Lyon"), output_bytes=16)
  judge = unique_binding("fake:upper", output_bytes=512)

  def pipeline(q, key):
    answers = patterns.ensemble(sampler, q, n=5, key=key)
    return patterns.majority_vote(answers), patterns.judge(judge, q, answers)

  q, key = text.encode("Capital of France?", 32), jax.random.key(1)
  got = xcs_jax.jit(pipeline)(q, key)
  want = jax.jit(pipeline)(q, key)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
