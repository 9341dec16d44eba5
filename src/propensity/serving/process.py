"""Waiting for and stopping a scoring-server process (no bentoml import)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx

__all__ = ["wait_ready", "stop"]


def wait_ready(url: str, process: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Block until ``url/readyz`` answers 200.

    Raises
    ------
    RuntimeError
        The process exited first, or it was not ready within ``timeout`` seconds.

    Examples
    --------
    >>> server = serve(load_settings(), port=3000, wait=False)  # doctest: +SKIP
    >>> wait_ready("http://127.0.0.1:3000", server)  # doctest: +SKIP
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the scoring server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scoring server was not ready within {timeout:.0f} s")
        time.sleep(0.3)


def stop(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Terminate the server, killing it if it does not exit within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
