"""`alignguard capsule train|eval` (R-Capsule); the implementation lives in `alignguard.capsule.cli`."""

from alignguard.capsule.cli import add_parser

__all__ = ["add_parser"]
