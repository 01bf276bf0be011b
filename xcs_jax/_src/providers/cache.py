"""The response cache: answers of deterministic calls, in memory and on disk.

Each runtime owns one `ResponseCache`. A key is a tuple of plain values: what
identifies the model (provider, model, endpoint, the parameters that change
the answer; never an API key), the kind of call and the request itself
(prompt, seed, options). Values are what the provider returned (a
`Completion`, an array), so bindings that differ only in how the answer is
stored (`output_bytes`, `timeout_s`, ...) share entries.

- **memory**: a bounded LRU of `memory_entries` entries (default 65,536).
- **disk**: one SQLite file per cache directory (`cache_dir`, default the
  `XCS_JAX_CACHE_DIR` environment variable, else
  `$XDG_CACHE_HOME/xcs_jax/responses`, else `~/.cache/xcs_jax/responses`),
  shared by processes (WAL mode); the directory is created 0700 and the
  files 0600. Every entry carries a SHA-256 of its payload: an entry that
  does not match, cannot be decoded, or a file that is not a database is a
  `RuntimeWarning` and a miss (a broken file is moved aside), never a crash
  or a wrong answer.
- **single flight**: while a request is in flight, identical requests wait
  for its answer instead of being sent again (`begin` / `end`); if it fails,
  one of them is sent in its place.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
import warnings
from typing import Any, Iterable

import numpy as np

from xcs_jax._src.providers.base import Completion

DEFAULT_MEMORY_ENTRIES = 65536
CACHE_DIR_ENV = "XCS_JAX_CACHE_DIR"
MISS = object()
_DB_NAME = "responses.sqlite3"
_SQL_CHUNK = 500


def default_cache_dir() -> str:
  """Where disk caches live unless told otherwise (see the module doc)."""
  configured = os.environ.get(CACHE_DIR_ENV)
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "xcs_jax", "responses")


def digest(key: tuple) -> str:
  """A stable name for a key, the same in every process (keys hold plain values)."""
  return hashlib.sha256(repr(key).encode("utf-8", "surrogatepass")).hexdigest()


def encode_value(value: Any) -> tuple[str, bytes]:
  if isinstance(value, Completion):
    return "completion", json.dumps(
        [value.text, value.prompt_tokens, value.completion_tokens]).encode()
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(value), allow_pickle=False)
  return "array", buffer.getvalue()


def decode_value(kind: str, payload: bytes) -> Any:
  if kind == "completion":
    text, prompt_tokens, completion_tokens = json.loads(payload.decode())
    if not (isinstance(text, str) and isinstance(prompt_tokens, int)
            and isinstance(completion_tokens, int)):
      raise ValueError("not a completion")
    return Completion(text, prompt_tokens, completion_tokens)
  if kind == "array":
    return np.load(io.BytesIO(payload), allow_pickle=False)
  raise ValueError(f"unknown kind {kind!r}")


class _Disk:
  """The SQLite file of one cache directory."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, _DB_NAME)
    self._lock = threading.Lock()
    self._db: sqlite3.Connection | None = None

  def _connect(self) -> sqlite3.Connection:
    if self._db is None:
      os.makedirs(self.directory, mode=0o700, exist_ok=True)
      os.chmod(self.directory, 0o700)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
      os.close(fd)
      os.chmod(self.path, 0o600)
      try:
        self._db = self._open()
      except sqlite3.DatabaseError as e:
        broken = f"{self.path}.broken-{int(time.time())}"
        os.replace(self.path, broken)
        warnings.warn(f"xcs_jax: the response cache {self.path} could not be read ({e}); "
                      f"moved it to {broken} and started an empty one.", RuntimeWarning,
                      stacklevel=4)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = self._open()
    return self._db

  def _open(self) -> sqlite3.Connection:
    db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                         isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, kind TEXT, "
               "payload BLOB, checksum TEXT, created REAL)")
    for suffix in ("-wal", "-shm"):
      if os.path.exists(self.path + suffix):
        os.chmod(self.path + suffix, 0o600)
    return db

  def get_many(self, names: list[str]) -> dict[str, Any]:
    found = {}
    with self._lock:
      db = self._connect()
      for start in range(0, len(names), _SQL_CHUNK):
        chunk = names[start:start + _SQL_CHUNK]
        rows = db.execute(
            f"SELECT key, kind, payload, checksum FROM responses WHERE key IN "
            f"({','.join('?' * len(chunk))})", chunk).fetchall()
        for name, kind, payload, checksum in rows:
          value = self._checked(db, name, kind, payload, checksum)
          if value is not MISS:
            found[name] = value
    return found

  def _checked(self, db, name, kind, payload, checksum) -> Any:
    try:
      if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != checksum:
        raise ValueError("checksum mismatch")
      return decode_value(kind, payload)
    except Exception as e:  # noqa: BLE001 - any damage is a miss, never a crash
      warnings.warn(f"xcs_jax: a damaged entry in the response cache {self.path} "
                    f"({type(e).__name__}: {e}) was dropped; the request is sent again.",
                    RuntimeWarning, stacklevel=5)
      db.execute("DELETE FROM responses WHERE key = ?", (name,))
      return MISS

  def put(self, name: str, value: Any) -> None:
    kind, payload = encode_value(value)
    with self._lock:
      self._connect().execute(
          "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
          (name, kind, payload, hashlib.sha256(payload).hexdigest(), time.time()))

  def close(self) -> None:
    with self._lock:
      if self._db is not None:
        self._db.close()
        self._db = None


class ResponseCache:
  """A runtime's response cache (see the module doc).

  Args:
    memory_entries: entries kept in memory (least recently used dropped).
    directory: the disk cache's directory (created on first use).
  """

  def __init__(self, memory_entries: int = DEFAULT_MEMORY_ENTRIES,
               directory: str | None = None):
    self.memory_entries = memory_entries
    self.directory = directory or default_cache_dir()
    self._memory: collections.OrderedDict = collections.OrderedDict()
    self._outputs: collections.OrderedDict = collections.OrderedDict()  # op -> {key: outputs}
    self._outputs_count = 0
    self._lock = threading.Lock()
    self._flights: dict = {}
    self._disk: _Disk | None = None

  def _disk_store(self) -> _Disk:
    with self._lock:
      if self._disk is None:
        self._disk = _Disk(self.directory)
      return self._disk

  # -- lookups -----------------------------------------------------------------------

  def lookup_many(self, keys: Iterable[tuple], disk: bool) -> dict[int, Any]:
    """{position: value} for the keys found (memory first, then disk)."""
    keys = list(keys)
    found = {}
    with self._lock:
      memory = self._memory
      for i, key in enumerate(keys):
        value = memory.get(key, MISS)
        if value is not MISS:
          memory.move_to_end(key)
          found[i] = value
    if disk and len(found) < len(keys):
      missing = [i for i in range(len(keys)) if i not in found]
      names = {digest(keys[i]): i for i in missing}
      for name, value in self._disk_store().get_many(list(names)).items():
        found[names[name]] = value
        self._remember(keys[names[name]], value)
    return found

  def lookup(self, key: tuple, disk: bool) -> Any:
    """The cached value of `key`, or `MISS`."""
    return self.lookup_many([key], disk).get(0, MISS)

  def store(self, key: tuple, value: Any, disk: bool) -> None:
    self._remember(key, value)
    if disk:
      self._disk_store().put(digest(key), value)

  def _remember(self, key: tuple, value: Any) -> None:
    with self._lock:
      self._memory[key] = value
      self._memory.move_to_end(key)
      while len(self._memory) > self.memory_entries:
        self._memory.popitem(last=False)

  def outputs_many(self, op: Any, found: list[tuple[int, tuple, Any]]
                   ) -> tuple[list[tuple[int, Any]], tuple[int, Exception] | None]:
    """What `op` makes of values found in the cache (`op.outputs(value)`, its
    arrays) for `found`, a list of `(i, key, value)`: `([(i, outputs)], None)`,
    or, where `op.outputs` raised for item i, `(those made so far, (i, error))`.

    Outputs are made once per op and key and kept beside the values (a
    bounded memo per op, oldest entries out first), so a hit costs a lookup,
    not a re-encoding.
    """
    with self._lock:
      memo = self._outputs.get(op)
      if memo is not None:
        self._outputs.move_to_end(op)
      done, todo = [], []
      for i, key, value in found:
        got = None if memo is None else memo.get(key)
        if got is None:
          todo.append((i, key, value))
        else:
          done.append((i, got))
    made, failure = [], None
    for i, key, value in todo:
      try:
        made.append((i, key, op.outputs(value)))
      except Exception as e:  # e.g. an answer longer than this op's output_bytes
        failure = (i, e)
        break
    if made:
      with self._lock:
        memo = self._outputs.setdefault(op, {})
        self._outputs.move_to_end(op)
        for _, key, outputs in made:
          if key not in memo:
            memo[key] = outputs
            self._outputs_count += 1
        self._evict_outputs()
    return done + [(i, outputs) for i, _, outputs in made], failure

  def _evict_outputs(self) -> None:
    """Drops the oldest memo entries (of the least recently used op first)
    beyond `memory_entries` (with the lock held)."""
    while self._outputs_count > self.memory_entries:
      op, memo = next(iter(self._outputs.items()))
      del memo[next(iter(memo))]
      self._outputs_count -= 1
      if not memo:
        del self._outputs[op]

  def __len__(self) -> int:
    with self._lock:
      return len(self._memory)

  def clear(self) -> None:
    """Forgets what is in memory (the disk file stays)."""
    with self._lock:
      self._memory.clear()
      self._outputs.clear()
      self._outputs_count = 0

  # -- single flight -----------------------------------------------------------------

  def begin(self, key: tuple) -> cf.Future | None:
    """None: the caller sends the request (and must `end` it); else the future
    of the identical request in flight: it gives the value, or None if that
    request failed (then call `begin` again)."""
    with self._lock:
      flight = self._flights.get(key)
      if flight is None:
        self._flights[key] = cf.Future()
      return flight

  def end(self, key: tuple, value: Any = MISS) -> None:
    """Ends the caller's flight: waiters get `value`, or None (send it yourself)."""
    with self._lock:
      flight = self._flights.pop(key, None)
    if flight is not None:
      flight.set_result(None if value is MISS else value)

  def close(self) -> None:
    if self._disk is not None:
      self._disk.close()
