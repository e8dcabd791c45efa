"""A server whose dependency is missing: dies of a real ModuleNotFoundError traceback."""

import sys

print("loading the inference engine...", flush=True)
sys.stdout.flush()

import does_not_exist_xyz  # noqa: E402,F401

print("unreachable")
