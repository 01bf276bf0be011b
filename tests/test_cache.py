"""The response cache: what is cached, under which key, in memory and on disk."""
from __future__ import annotations

import contextvars
import functools
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xcs_jax
from xcs_jax import models, text
from xcs_jax._src.providers import cache as cache_lib

from conftest import InFlight, unique_binding


def prompts(*items, n=16):
  return jnp.asarray(text.encode(list(items), n))


@pytest.fixture
def rt(tmp_path):
  with xcs_jax.runtime(cache_dir=str(tmp_path / "cache")) as r:
    yield r


def counting(monkeypatch, rt, method="generate", parties=None):
  provider = rt.provider("fake")
  rec = InFlight(parties)
  original = getattr(type(provider), method)
  monkeypatch.setattr(provider, method, rec.wrap(functools.partial(original, provider)))
  return rec


def test_deterministic_calls_are_cached_by_default_and_hits_are_counted(rt):
  b = unique_binding("fake:echo", output_bytes=16)            # temperature 0
  f = jax.jit(jax.vmap(b))
  first = f(prompts("a", "b", "c"))
  again = f(prompts("a", "b", "c"))
  np.testing.assert_array_equal(first, again)
  u = b.usage()
  assert (u.calls, u.cache_hits) == (3, 3)
  assert xcs_jax.usage()[str(b)]["cache_hits"] == 3


def test_hits_skip_the_provider_and_only_misses_go_out_as_one_batch(rt, monkeypatch):
  b = unique_binding("fake:echo", output_bytes=16)
  jax.jit(jax.vmap(b))(prompts("a", "b"))
  rec = counting(monkeypatch, rt, parties=2)   # the 2 misses must be in flight together
  out = jax.jit(jax.vmap(b))(prompts("a", "x", "b", "y"))
  assert text.decode(out) == ["a", "x", "b", "y"]
  assert rec.calls == 2 and rec.peak == 2
  assert b.usage().cache_hits == 2


def test_sampled_calls_without_a_key_are_not_cached_unless_asked(rt):
  sampled = unique_binding("fake:choice", temperature=0.7, output_bytes=8)
  f = jax.jit(jax.vmap(sampled))
  f(prompts("q", "q"))
  f(prompts("q", "q"))
  assert sampled.usage().cache_hits == 0 and sampled.usage().calls == 4
  keyed = jax.jit(lambda p, k: sampled(p, key=k))
  keyed(prompts("q")[0], jax.random.key(1))
  keyed(prompts("q")[0], jax.random.key(1))          # same key: the same request
  assert sampled.usage().cache_hits == 1
  forced = sampled.replace(cache="memory")
  forced(prompts("z")[0])
  forced(prompts("z")[0])
  assert forced.usage().cache_hits == 1


def test_the_key_holds_every_parameter_that_changes_the_answer(rt):
  base = unique_binding("fake:choice", output_bytes=8, choices=("yes", "no"))
  base(prompts("q")[0])
  # Another answer-changing parameter: a miss; only the storage differs: a hit.
  other = base.replace(choices=("maybe", "never"))
  other(prompts("q")[0])
  assert other.usage().calls == 1
  wider = base.replace(output_bytes=32, timeout_s=5.0, retries=1)
  wider(prompts("q")[0])
  assert wider.usage().cache_hits == 1 and wider.usage().calls == 0
  key = rt.provider("fake").cache_identity(base)
  assert ("choices", ("yes", "no")) in key and not any(k == "output_bytes" for k, *_ in key[2:])


def test_score_options_and_embed_are_cached_and_invalid_values_never_are(rt):
  b = unique_binding("fake:echo")
  s1 = b.score_options(prompts("good movie"), ("good", "bad"))
  s2 = b.score_options(prompts("good movie"), ("good", "bad"))
  e1, e2 = b.embed(prompts("hello")), b.embed(prompts("hello"))
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_array_equal(e1, e2)
  assert b.usage().cache_hits == 2 and b.usage().calls == 2
  # Another option set is another request.
  b.score_options(prompts("good movie"), ("bad", "good"))
  assert b.usage().calls == 3


@pytest.mark.parametrize("mode", ["eager", "xcs_jax.jit", "jax.jit"])
def test_a_hit_this_binding_cannot_hold_fails_as_the_call_would(rt, mode):
  # output_bytes does not key the cache (it does not change the answer): a
  # narrower binding finds the wider one's answer, which it cannot hold.
  wide = unique_binding("fake:echo", output_bytes=16)
  narrow = wide.replace(output_bytes=2)
  xs = prompts("a", "long answer")
  jax.vmap(wide)(xs)                                   # both answers cached
  run = {"eager": jax.vmap(narrow), "xcs_jax.jit": xcs_jax.jit(jax.vmap(narrow)),
         "jax.jit": jax.jit(jax.vmap(narrow))}[mode]
  error = jax.errors.JaxRuntimeError if mode == "jax.jit" else xcs_jax.XCSExecutionError
  with pytest.raises(error, match=r"generate call to fake:echo(.|\n)*output_bytes=2"):
    run(xs)
  assert narrow.usage().calls == 0                     # answered (and refused) by the cache


def test_identical_requests_in_flight_are_sent_once(rt, monkeypatch):
  rec = counting(monkeypatch, rt)
  b = unique_binding("fake:echo", latency_s=0.2, output_bytes=16)
  results = []

  def ask():
    results.append(text.decode(b(prompts("same")[0])))
  # Each thread in a copy of this context: `rt` is current there too.
  threads = [threading.Thread(target=contextvars.copy_context().run, args=(ask,))
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert results == ["same"] * 4
  assert rec.calls == 1 and b.usage().calls == 1 and b.usage().cache_hits == 3
  # Duplicates inside one batch too.
  out = jax.jit(jax.vmap(b))(prompts("d", "d", "d"))
  assert text.decode(out) == ["d"] * 3 and rec.calls == 2


def test_a_failed_request_is_not_cached_and_its_waiters_send_their_own(rt):
  b = unique_binding("fake:echo", transient_failures=1, retries=0, output_bytes=16)
  with pytest.raises(xcs_jax.XCSExecutionError):
    b(prompts("x")[0])
  assert text.decode(b(prompts("x")[0])) == "x"          # not a cached failure
  assert b.usage().cache_hits == 0 and b.usage().calls == 2


def test_the_runtime_can_turn_caching_off(tmp_path):
  with xcs_jax.runtime(cache=False):
    b = unique_binding("fake:echo", output_bytes=16, cache="disk")
    b(prompts("a")[0])
    b(prompts("a")[0])
    assert b.usage().calls == 2 and b.usage().cache_hits == 0


def test_the_memory_cache_is_a_bounded_lru():
  c = cache_lib.ResponseCache(memory_entries=2)
  c.store(("a",), 1, disk=False)
  c.store(("b",), 2, disk=False)
  c.lookup(("a",), disk=False)                 # a is now the most recent
  c.store(("c",), 3, disk=False)
  assert c.lookup(("b",), disk=False) is cache_lib.MISS
  assert c.lookup(("a",), disk=False) == 1 and len(c) == 2


class _Doubling:
  """An op whose outputs are made from a cached value (counting the makes)."""

  def __init__(self):
    self.made = 0

  def outputs(self, value):
    if value < 0:
      raise ValueError(f"cannot hold {value}")
    self.made += 1
    return [np.asarray(2 * value)]


def test_outputs_of_hits_are_made_once_per_op_and_bounded():
  c = cache_lib.ResponseCache(memory_entries=3)
  a, b = _Doubling(), _Doubling()
  found = [(0, ("x",), 1), (1, ("y",), 2)]
  out, failure = c.outputs_many(a, found)
  assert failure is None and sorted((i, int(o[0])) for i, o in out) == [(0, 2), (1, 4)]
  c.outputs_many(a, found)
  assert a.made == 2                              # the second time: from the memo
  c.outputs_many(b, found)                        # another op makes its own
  assert b.made == 2
  c.outputs_many(a, [(0, ("x",), 1)])             # b made 4 > 3: a's oldest went
  assert a.made == 3 and c._outputs_count == 3
  out, failure = c.outputs_many(a, [(0, ("z",), 3), (1, ("w",), -1), (2, ("v",), 5)])
  assert [i for i, _ in out] == [0] and failure[0] == 1
  assert "cannot hold -1" in str(failure[1])


def test_the_disk_cache_is_private_and_moved_by_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(cache_lib.CACHE_DIR_ENV, str(tmp_path / "moved"))
  assert cache_lib.default_cache_dir() == str(tmp_path / "moved")
  with xcs_jax.runtime() as r:
    b = unique_binding("fake:echo", output_bytes=16, cache="disk")
    b(prompts("a")[0])
    path = r.response_cache._disk.path
  assert path.startswith(str(tmp_path / "moved"))
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


_CHILD = textwrap.dedent("""
    import sys
    import xcs_jax
    from xcs_jax import models, text
    with xcs_jax.runtime(cache_dir=sys.argv[1]):
      b = models.bind("fake:echo", output_bytes=16, cache="disk", system_prompt="two-procs")
      out = text.decode(b(text.encode(sys.argv[2], 16)))
      u = b.usage()
      print(out, u.calls, u.cache_hits)
""")


def test_the_disk_cache_is_shared_across_processes(tmp_path):
  def run(prompt):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), prompt],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()

  assert run("hello") == ["hello", "1", "0"]
  assert run("hello") == ["hello", "0", "1"]      # another process: a hit from disk


def test_a_damaged_entry_is_a_warning_and_a_miss(tmp_path):
  with xcs_jax.runtime(cache_dir=str(tmp_path)) as r:
    b = unique_binding("fake:echo", output_bytes=16, cache="disk")
    b(prompts("a")[0])
    db = sqlite3.connect(r.response_cache._disk.path)
    db.execute("UPDATE responses SET payload = ?", (b"not what was stored",))
    db.commit()
    db.close()
    r.response_cache.clear()                       # forget the memory copy
    with pytest.warns(RuntimeWarning, match="damaged entry"):
      assert text.decode(b(prompts("a")[0])) == "a"
    assert b.usage().calls == 2


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  (folder / "responses.sqlite3").write_bytes(b"this is not a database" * 100)
  with xcs_jax.runtime(cache_dir=str(folder)):
    b = unique_binding("fake:echo", output_bytes=16, cache="disk")
    with pytest.warns(RuntimeWarning, match="could not be read"):
      assert text.decode(b(prompts("a")[0])) == "a"
  assert any(p.name.startswith("responses.sqlite3.broken") for p in folder.iterdir())


def test_bad_cache_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="cache"):
    models.bind("fake:echo", cache="forever")
  with pytest.raises(TypeError, match="cache"):
    xcs_jax.runtime(cache="no")
  with pytest.raises(ValueError, match="cache_entries"):
    xcs_jax.runtime(cache_entries=0)
