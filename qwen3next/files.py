"""Atomic file writes: every file the project writes appears whole or not at all (written under a
temporary name beside its target, then renamed onto it)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_open(target: str, mode: str = "w", **open_kwargs):
    """`open` a temporary file beside `target`; a clean exit renames it onto `target`."""
    tmp = target + ".tmp"
    with open(tmp, mode, **open_kwargs) as f:
        yield f
    os.replace(tmp, target)


def atomic_write(target: str, write) -> None:
    """`write(path)` to a temporary path beside `target`, then rename it onto `target` (for writers that
    take a path: safetensors, matplotlib)."""
    tmp = target + ".tmp"
    write(tmp)
    os.replace(tmp, target)
