"""Shared fixtures: paths to the test servers and a check that no process is left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "servers"
ECHO_SERVER = ROOT / "examples" / "servers" / "echo_server.py"


@pytest.fixture
def no_orphans():
    """Fail the test if any process started during it outlives it."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid in before or proc.pid == os.getpid():
            continue
        if str(SCRIPTS) in cmd or str(ECHO_SERVER) in cmd:
            leftover.append(f"{proc.pid}: {cmd}")
    for pid in leftover:
        try:
            psutil.Process(int(pid.split(":")[0])).kill()
        except psutil.Error:
            pass
    assert not leftover, f"processes left behind: {leftover}"


PYTHON = sys.executable
