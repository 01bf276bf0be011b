"""Real OpenAI-compatible servers for the tests: `python -m llama_cpp.server`
on the SmolLM2 GGUF, on 127.0.0.1, always stopped afterwards."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

READY_TIMEOUT_S = 90


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def chat_model(gguf: str, alias: str = "smollm2") -> dict:
  """A chat and completions model, with `logits_all` so echoed prompts carry
  log-probabilities."""
  return {"model": gguf, "n_threads": 1, "verbose": False, "model_alias": alias,
          "logits_all": True, "n_ctx": 2048}


def embed_model(gguf: str, alias: str = "smollm2-embed") -> dict:
  return {"model": gguf, "n_threads": 1, "verbose": False, "model_alias": alias,
          "embedding": True, "n_ctx": 512,
          "kv_overrides": ["llama.pooling_type=int:1"]}     # 1: mean pooling


class Server:
  """One running server; `stop()` ends it (a replica killed mid-batch)."""

  def __init__(self, models: list[dict], folder):
    self.port = free_port()
    config = {"host": "127.0.0.1", "port": self.port, "models": models}
    config_path = folder / f"config-{self.port}.json"
    config_path.write_text(json.dumps(config))
    self.log = open(folder / f"server-{self.port}.log", "w+")
    self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file",
                                  str(config_path)], stdout=self.log,
                                 stderr=subprocess.STDOUT)
    self.base_url = f"http://127.0.0.1:{self.port}/v1"

  def wait_ready(self) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
      if self.proc.poll() is not None:
        self.log.seek(0)
        raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n"
                           f"{self.log.read()[-3000:]}")
      try:
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=1):
          return
      except OSError:
        if time.monotonic() > deadline:
          raise RuntimeError(f"llama_cpp.server not ready after {READY_TIMEOUT_S} s")
        time.sleep(0.2)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=10)
    self.log.close()


@contextlib.contextmanager
def servers(model_lists: list[list[dict]], folder) -> Iterator[list[Server]]:
  """Starts one server per list of models (all at once), yields them ready."""
  running = [Server(models, folder) for models in model_lists]
  try:
    for s in running:
      s.wait_ready()
    yield running
  finally:
    for s in running:
      s.stop()
