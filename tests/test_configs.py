"""Every shipped YAML preset parses through the real CLI into valid configs (the heavy `main` is mocked).

Run: python -m pytest -q tests/test_configs.py
"""

import importlib
from pathlib import Path

import pytest

from alignguard.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1] / "configs"
# configs/accelerate holds `accelerate launch` configs (tests/test_distributed.py); configs/capsule is checked by
# tests/test_capsule_cli.py. Everything else is named <subcommand>[-variant].yaml.
PRESETS = sorted(p for p in ROOT.rglob("*.yaml") if not {"accelerate", "capsule"} & set(p.parts))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_preset_parses_through_the_cli(path, monkeypatch):
    cmd = path.stem.split("-")[0]
    module = importlib.import_module(cli_main.COMMANDS[cmd])
    calls = []
    monkeypatch.setattr(module, "main", lambda args: calls.append(module.resolve(args)) or 0)
    assert cli_main.main([cmd, "--config", str(path)]) == 0
    assert len(calls) == 1  # parsed once, into validated dataclasses
    assert all(hasattr(cfg, "__dataclass_fields__") for cfg in calls[0])


def test_presets_exist():
    assert len(PRESETS) >= 6
