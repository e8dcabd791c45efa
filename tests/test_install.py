"""The README's set-up commands install from PyPI alone: the Makefile's torch step, run as a fresh
machine without PyTorch's CPU index would run it (pip's own defaults: no local wheel folder, no
mirror, no constraints), resolves a torch. ``--dry-run`` resolves without installing; it needs
PyPI, so the test is skipped, saying so, where PyPI cannot be reached."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _pypi_only_env() -> dict[str, str]:
    """This process's environment less every pip setting: pip as on a fresh machine."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no user, site or global configuration (find-links, mirrors)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_makefiles_torch_step_falls_back_to_pypis_torch_without_pytorchs_index(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI cannot be reached from here: the check resolves torch on PyPI")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # (make would run its own pip upgrade)
    result = subprocess.run(
        [
            "make", "--no-print-directory", "-C", str(ROOT), f"{venv}/.installed-torch",
            f"VENV={venv}", "PIP_INSTALL_FLAGS=--dry-run --no-deps",
            "TORCH_INDEX=http://127.0.0.1:9/simple",  # PyTorch's CPU index, unreachable (nothing listens on port 9)
        ],
        env=_pypi_only_env(), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is not to be had from http://127.0.0.1:9/simple: installing PyPI's torch instead" in output
    assert "Would install torch-" in output, output
