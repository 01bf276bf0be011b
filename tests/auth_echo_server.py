"""A loopback HTTP server that rejects every request and echoes its API key.

Some real APIs quote the key they were sent in their "invalid key" errors;
this stand-in does so verbatim, to check that xcs_jax never passes the key on
in its own errors.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Iterator


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_POST(self):  # noqa: N802 (http.server's naming)
    length = int(self.headers.get("content-length") or 0)
    self.rfile.read(length)
    sent = (self.headers.get("authorization") or "").removeprefix("Bearer ")
    sent = sent or self.headers.get("x-api-key") or ""
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {sent}",
                                 "type": "invalid_request_error",
                                 "code": "invalid_api_key"}}).encode()
    self.send_response(401)
    self.send_header("content-type", "application/json")
    self.send_header("content-length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):  # quiet
    pass


@contextlib.contextmanager
def auth_echo_server() -> Iterator[str]:
  """Yields the server's base URL (``http://127.0.0.1:<port>``)."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def error_texts(error: BaseException) -> str:
  """str, repr and attributes of `error` and of every exception chained to it."""
  parts, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    parts += [str(error), repr(error)]
    # Attributes too (an SDK error keeps its request, headers included).
    parts += [repr(v) for v in vars(error).values()]
    request = getattr(error, "request", None)
    if request is not None:
      parts.append(repr(dict(getattr(request, "headers", {}))))
    error = error.__cause__ or error.__context__
  return "\n".join(parts)
