"""Progress bars for long runs: when they show, what they count, how they nest."""
import io

import jax
import jax.numpy as jnp
import pytest
import tqdm.std

import xcs_jax
from xcs_jax._src import progress

from jit_helpers import Recorder


class Bars:
  """Records the tqdm bars made (written to a buffer, not the terminal)."""

  def __init__(self):
    self.made = []

  def factory(self, *args, **kwargs):
    kwargs["file"] = io.StringIO()
    bar = tqdm.std.tqdm(*args, **kwargs)
    bar.kwargs = kwargs
    self.made.append(bar)
    return bar


@pytest.fixture
def bars(monkeypatch):
  """Bars show at once, on an output that counts as a terminal."""
  rec = Bars()
  monkeypatch.setattr(progress, "DELAY_S", 0.0)
  monkeypatch.setattr(progress, "REFRESH_S", 0.0)
  monkeypatch.setattr(progress, "output_shows_bars", lambda: True)
  monkeypatch.setattr(progress.tqdm.auto, "tqdm", rec.factory)
  monkeypatch.delenv(progress.ENV, raising=False)
  return rec


def _slow_batch(n=6, latency=0.05):
  op = Recorder().op("slow", latency, concurrency=2)
  return xcs_jax.jit(jax.vmap(op)), jnp.arange(float(n))


def test_a_long_run_gets_a_transient_bar_that_counts_its_calls(bars):
  f, xs = _slow_batch()
  f(xs)
  assert len(bars.made) == 1
  bar = bars.made[0]
  assert bar.kwargs["leave"] is False and bar.kwargs["unit"] == "call"
  assert "slow" in bar.desc or "xcs_jax.jit" in bar.desc
  assert bar.total == 6 and 2 <= bar.n <= 6      # updated while the calls ran
  assert bar not in tqdm.std.tqdm._instances         # closed when the run ended


def test_eager_batched_calls_get_a_bar_too(bars):
  op = Recorder().op("eager_slow", 0.05, concurrency=2)
  jax.vmap(op)(jnp.arange(4.0))
  assert len(bars.made) == 1 and "eager_slow" in bars.made[0].desc


def test_no_bar_for_short_runs(bars, monkeypatch):
  monkeypatch.setattr(progress, "DELAY_S", 60.0)
  f, xs = _slow_batch(2, 0.01)
  f(xs)
  assert bars.made == []


def test_opt_out_by_argument_and_by_environment(bars, monkeypatch):
  op = Recorder().op("quiet", 0.02, concurrency=1)
  xcs_jax.jit(jax.vmap(op), progress=False)(jnp.arange(3.0))
  assert bars.made == []
  monkeypatch.setenv(progress.ENV, "0")
  xcs_jax.jit(jax.vmap(op))(jnp.arange(3.0))
  jax.vmap(op)(jnp.arange(3.0))
  assert bars.made == []
  with pytest.raises(TypeError, match="progress"):
    xcs_jax.jit(lambda x: x, progress="yes")


def test_quiet_when_output_is_neither_a_terminal_nor_a_notebook(monkeypatch):
  rec = Bars()
  monkeypatch.setattr(progress, "DELAY_S", 0.0)
  monkeypatch.setattr(progress.tqdm.auto, "tqdm", rec.factory)
  monkeypatch.setattr(progress.sys, "stderr", io.StringIO())   # a log file, not a tty
  f, xs = _slow_batch(3, 0.02)
  f(xs)
  assert rec.made == []


def test_nests_under_an_outer_loops_bar(bars):
  f, xs = _slow_batch(4, 0.03)
  outer = tqdm.std.tqdm(range(2), file=io.StringIO(), desc="epochs")
  try:
    for _ in outer:
      f(xs)
  finally:
    outer.close()
  assert len(bars.made) == 2
  for bar in bars.made:
    assert bar.pos != outer.pos       # below the outer bar, not on top of it
    assert bar.kwargs["leave"] is False
