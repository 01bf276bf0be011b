"""A fault-injecting HTTP proxy for the tests, in front of a real server.

Stdlib only (asyncio streams on a thread of its own). Each request is sent
upstream on a fresh connection (`Connection: close`) and the answer relayed
back. Faults, all adjustable while it runs:

- `delay_s`: wait this long before forwarding each request;
- `max_rate`: above this many requests per second (a sliding 1 s window),
  answer `429 Too Many Requests` with `Retry-After: retry_after_s` instead;
- `drop_next`: close the next N connections without an answer;
- `refuse()`: stop listening (connections refused), as a dead replica.

`forwarded` holds the monotonic time of every request sent upstream, `limited`
counts the 429s.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time


class FaultProxy:
  def __init__(self, upstream_host: str, upstream_port: int):
    self.upstream = (upstream_host, upstream_port)
    self.delay_s = 0.0
    self.max_rate: float | None = None
    self.retry_after_s = 1.0
    self.drop_next = 0
    self.forwarded: list[float] = []
    self.limited = 0
    self.dropped = 0
    self._recent: collections.deque = collections.deque()
    self._closing = asyncio.Event()
    self._lock = threading.Lock()
    self._loop = asyncio.new_event_loop()
    self._server = None
    self.port = None
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                    name="fault-proxy")
    self._thread.start()
    self._call(self._start())

  def _call(self, coro):
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

  async def _start(self):
    self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port or 0)
    self.port = self._server.sockets[0].getsockname()[1]

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def refuse(self) -> None:
    """Stops listening: new connections are refused."""
    async def stop():
      self._server.close()
      await self._server.wait_closed()
    self._call(stop())

  def close(self) -> None:
    with contextlib.suppress(Exception):
      self.refuse()
    with contextlib.suppress(Exception):
      self._call(self._end_connections())
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(5)

  async def _end_connections(self):
    """Ends the connections still open, so that none outlives the loop: delayed
    ones at once, forwarded ones after a second for their answer, if any."""
    self._closing.set()
    for _ in range(3):      # (a connection accepted while closing starts a new one)
      tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      if not tasks:
        return
      _, running = await asyncio.wait(tasks, timeout=1.0)
      for t in running:
        t.cancel()
      if running:
        await asyncio.wait(running, timeout=1.0)

  # -- one connection -----------------------------------------------------------------

  async def _handle(self, reader, writer):
    try:
      head = await reader.readuntil(b"\r\n\r\n")
      length = 0
      for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
          length = int(line.split(b":", 1)[1])
      body = await reader.readexactly(length) if length else b""
      with self._lock:
        drop = self.drop_next > 0
        if drop:
          self.drop_next -= 1
          self.dropped += 1
      if drop:
        return                             # closed without an answer
      if self._over_rate():
        self.limited += 1
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                     b"Retry-After: " + str(self.retry_after_s).encode() + b"\r\n"
                     b"Content-Length: 36\r\nConnection: close\r\n\r\n"
                     b'{"error":{"message":"rate limited"}}')
        await writer.drain()
        return
      if self.delay_s:
        with contextlib.suppress(asyncio.TimeoutError):
          await asyncio.wait_for(self._closing.wait(), self.delay_s)
        if self._closing.is_set():
          return                           # the proxy is closing
      with self._lock:
        self.forwarded.append(time.monotonic())
      await self._forward(head, body, writer)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
      pass                                 # (cancelled: the proxy is closing)
    finally:
      writer.close()

  def _over_rate(self) -> bool:
    if self.max_rate is None:
      return False
    now = time.monotonic()
    with self._lock:
      while self._recent and now - self._recent[0] > 1.0:
        self._recent.popleft()
      if len(self._recent) >= self.max_rate:
        return True
      self._recent.append(now)
      return False

  async def _forward(self, head: bytes, body: bytes, writer) -> None:
    lines = [l for l in head.split(b"\r\n") if l and not l.lower().startswith(b"connection:")]
    head = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n"
    up_reader, up_writer = await asyncio.open_connection(*self.upstream)
    try:
      up_writer.write(head + body)
      await up_writer.drain()
      while chunk := await up_reader.read(65536):
        writer.write(chunk)
      await writer.drain()
    finally:
      up_writer.close()
