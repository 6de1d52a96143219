"""Atomic file output and run metadata.

Every output is written to a temporary file in the destination folder and renamed into place, so a run
killed mid-write never leaves a truncated file and never destroys the previous version.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextmanager
def _atomic_path(path: str | os.PathLike):
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with _atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path: str | os.PathLike, payload) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, atomically."""
    with _atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (recorded in every result)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("alignguard", "torch", "transformers", "peft", "trl", "accelerate", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (asset wheels often have broken imports)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
