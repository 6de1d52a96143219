"""The commands built on the compare harness (compare, scaling, calibrate) share their sections and set-up.

Each takes its own config, then the per-run TrainRunConfig (model, out, method, fisher and seed are set per row by
the harness, so they get no flag), AlignGuardConfig, FisherConfig and SubspaceConfig; each checks its output
folder against the resolved configs and saves them before it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import AlignGuardConfig, FisherConfig, SubspaceConfig
from ..recipes.common import check_output_dir
from ..recipes.train import TrainRunConfig
from .common import Command, Section, save_resolved_config

# TrainRunConfig fields the harness sets per row itself.
SET_BY_HARNESS = ("model", "out", "overwrite", "method", "fisher", "seed")


def harness_train_fields(lead: str, **extra: Callable[[Any], Any]) -> Callable[[dict], dict]:
    """`Section.derive` for the train section: model/out from the lead config (its --overwrite empties the whole
    run folder first, so the per-row one stays False); method/fisher/seed are placeholders the harness overrides
    per row. `extra` maps further fields to functions of the lead config (scaling records its longest length)."""

    def derive(done: dict) -> dict:
        cfg = done[lead]
        fields = {"model": cfg.model, "out": cfg.out, "overwrite": False, "method": "lora", "fisher": None, "seed": 0}
        fields.update({name: value(cfg) for name, value in extra.items()})
        return fields

    return derive


def harness_command(name, help, doc, lead_cls, set_by=SET_BY_HARNESS, extra_fields=None, yaml_also=()) -> Command:
    """A `Command` with sections (name: lead_cls), train, alignguard, fisher, subspace."""
    return Command(
        name,
        help,
        doc,
        [
            Section(name, lead_cls),
            Section("train", TrainRunConfig, tuple(set_by), harness_train_fields(name, **(extra_fields or {}))),
            Section("alignguard", AlignGuardConfig),
            Section("fisher", FisherConfig),
            Section("subspace", SubspaceConfig),
        ],
        yaml_also=yaml_also,
    )


def prepare_harness_run(command: Command, args) -> tuple:
    """Resolve the configs (defaults < YAML < flags), check the output folder, save config.yaml there; returns
    (lead config, TrainRunConfig, AlignGuardConfig, FisherConfig, SubspaceConfig)."""
    configs = command.resolve(args)
    lead = configs[command.name]
    check_output_dir(lead.out, command.name, configs, lead.overwrite)
    save_resolved_config(lead.out, configs)
    return tuple(configs.values())
