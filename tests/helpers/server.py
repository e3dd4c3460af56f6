"""Test-only: an `llmrun serve` subprocess on a free loopback port, started and stopped by the test."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving .* on (http://\S+) ")


class ServerProcess:
    """`with ServerProcess(model, "--parallel", "2") as srv:` ... srv.url; stderr lines in srv.log."""

    def __init__(self, model, *args: str, env: dict | None = None, startup_seconds: float = 120.0):
        self.cmd = [sys.executable, "-m", "llmrun.cli", "serve", str(model), "--port", "0", "--threads", "2", *args]
        self.env = {**os.environ, **(env or {})}
        self.startup_seconds = startup_seconds
        self.log: list[str] = []
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env=self.env)
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                m = READY.search(line)
                if m and self.url is None:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.startup_seconds) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log[-20:]))
        return self

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120.0), **kw)

    def wait_idle(self, seconds: float = 30.0) -> dict:
        """Poll /health until no slot is busy and nothing is queued (bounded)."""
        deadline = time.monotonic() + seconds
        with self.client() as c:
            while True:
                h = c.get("/health", headers=self.auth_headers()).json()
                if h["slots_busy"] == 0 and h["queued"] == 0:
                    return h
                if time.monotonic() > deadline:
                    raise AssertionError(f"server still busy after {seconds} s: {h}")
                time.sleep(0.05)

    def auth_headers(self) -> dict:
        if "--api-key" in self.cmd:
            return {"Authorization": "Bearer " + self.cmd[self.cmd.index("--api-key") + 1]}
        return {}

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __exit__(self, *exc):
        self.stop()
