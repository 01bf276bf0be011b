"""A checker for the Chrome trace event format, as Perfetto's JSON importer reads it.

Perfetto's own trace processor (the `perfetto` package) downloads a binary,
which machines without network access cannot, so tests check the structure
here: the fields each phase needs, complete (`X`) slices that nest on each
track, async (`b`/`e`) slices that pair up, timestamps in order per track,
and a name for the process and every track.
"""
from __future__ import annotations

import collections

PHASES = {"X", "b", "e", "M", "C", "i"}


def check_chrome_trace(trace: dict) -> list[dict]:
  """Raises AssertionError naming the first problem; returns the non-metadata events."""
  assert isinstance(trace, dict) and isinstance(trace.get("traceEvents"), list), \
      "a trace is an object with a `traceEvents` list"
  events = trace["traceEvents"]
  named_threads, named_process = set(), set()
  timed = []
  for e in events:
    assert isinstance(e.get("name"), str) and e["name"], f"event without a name: {e}"
    assert e.get("ph") in PHASES, f"unknown phase: {e}"
    assert isinstance(e.get("pid"), int) and isinstance(e.get("tid"), int), \
        f"pid and tid must be ints: {e}"
    if "args" in e:
      assert isinstance(e["args"], dict), f"args must be an object: {e}"
    if e["ph"] == "M":
      assert e["name"] in ("process_name", "thread_name", "thread_sort_index",
                           "process_sort_index"), e
      if e["name"] == "thread_name":
        named_threads.add((e["pid"], e["tid"]))
        assert isinstance(e["args"].get("name"), str), e
      if e["name"] == "process_name":
        named_process.add(e["pid"])
      continue
    assert isinstance(e.get("ts"), (int, float)) and e["ts"] >= 0, f"bad ts: {e}"
    if e["ph"] == "X":
      assert isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0, f"bad dur: {e}"
    if e["ph"] in ("b", "e"):
      assert "id" in e and isinstance(e.get("cat"), str), f"async events need id, cat: {e}"
    timed.append(e)

  by_track = collections.defaultdict(list)
  for e in timed:
    by_track[(e["pid"], e["tid"])].append(e)
  for track, evs in by_track.items():
    assert track in named_threads, f"track {track} has no thread_name"
    assert track[0] in named_process, f"process {track[0]} has no process_name"
    ts = [e["ts"] for e in evs]
    assert ts == sorted(ts), f"timestamps out of order on track {track}"
    open_ends: list = []                 # ends of the X slices enclosing the current one
    for e in evs:
      if e["ph"] != "X":
        continue
      while open_ends and e["ts"] >= open_ends[-1] - 1e-3:
        open_ends.pop()
      end = e["ts"] + e["dur"]
      if open_ends:
        assert end <= open_ends[-1] + 1e-3, f"slice {e['name']} overlaps its parent on {track}"
      open_ends.append(end)

  begun = {}
  for e in timed:
    key = (e.get("cat"), e.get("id"))
    if e["ph"] == "b":
      assert key not in begun, f"async id reused while open: {e}"
      begun[key] = e
    elif e["ph"] == "e":
      assert key in begun, f"async end without a begin: {e}"
      b = begun.pop(key)
      assert e["ts"] >= b["ts"] and e["name"] == b["name"], f"async end before begin: {e}"
  assert not begun, f"async slices never ended: {list(begun.values())[:3]}"
  return timed
