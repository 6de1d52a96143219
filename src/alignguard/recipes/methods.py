"""Method names of the comparison harness: the methods, and per-row overrides (`<method>@<field>=<value>[,...]`).

A name of `METHODS`, optionally with overrides of AlignGuardConfig fields (`alignguard@lambda_a=1000`), of the
TrainRunConfig fields in `TRAIN_OVERRIDES` (`plain_lora@poison_ratio=0`: the benign-drift control, the same
fine-tuning without harmful pairs) and, for a peer's row, of its own config (`PEER_CONFIGS`:
`asft@asft_lambda=10`, `lox@lox_rank=4,lox_alpha=1.0`). `reference_method` names the plain-LoRA row a row's drift reduction is
measured against: plain LoRA at the same poison ratio.
"""

from __future__ import annotations

from dataclasses import replace

from ..asft import AsftConfig
from ..config import AlignGuardConfig
from ..gradient_surgery import SurgeryConfig
from ..lisa import LisaConfig
from ..lox import LoxConfig
from ..self_screen import ScreenConfig
from .train import TrainRunConfig

# name -> (training method, AlignGuardConfig overrides, extra behaviour)
METHODS: dict[str, dict] = {
    "plain_lora": {"method": "lora"},
    "alignguard": {"method": "alignguard"},
    "ag_no_alignment": {"method": "alignguard", "ag": {"lambda_a": 0.0}},
    "ag_no_task": {"method": "alignguard", "ag": {"lambda_t": 0.0}},
    "ag_no_overlap": {"method": "alignguard", "ag": {"alpha": 0.0}},
    "ag_no_geodesic": {"method": "alignguard", "ag": {"alpha": 1.0}},
    "ag_project": {"method": "alignguard", "ag": {"mode": "project"}},
    "ag_kfac": {"method": "alignguard", "ag": {"alignment_input": "kfac"}},
    "random_subspace": {"method": "alignguard", "subspaces": "random"},
    "ewc": {"method": "alignguard", "subspaces": "full", "ag": {"lambda_t": 0.0, "lambda_nc": 0.0}},
    # EWC with the two-sided K-FAC Fisher G (x) A_in: the second-order change of the alignment loss.
    "ewc_kfac": {
        "method": "alignguard",
        "subspaces": "full",
        "ag": {"lambda_t": 0.0, "lambda_nc": 0.0, "alignment_input": "kfac"},
    },
    "safe_lora": {"method": "lora", "post": "safe_lora"},
    "replay": {"method": "lora", "replay": True},
    "alignguard_replay": {"method": "alignguard", "replay": True},
    # Peers (docs/design.md §5), both from the (base, aligned) pair like safe_lora: AsFT adds a penalty on the part
    # of the update outside the alignment direction; LoX extrapolates the alignment delta before plain LoRA.
    "asft": {"method": "lora", "peer": "asft"},
    "lox": {"method": "lora", "peer": "lox"},
    # Gradient surgery (SPF / PCGrad): plain LoRA whose task gradient loses its component that would raise the
    # alignment loss (the NLL of the Fisher pass's refusals), `alignguard.gradient_surgery`.
    "surgery": {"method": "lora", "peer": "surgery"},
    # Lisa (bi-state optimisation): plain LoRA that alternates steps on the Fisher pass's refusals and on the task,
    # with a proximal term to the weights at the last switch (`alignguard.lisa`).
    "lisa": {"method": "lora", "peer": "lisa"},
    # Self-screened data: plain LoRA without the examples whose prompt the aligned model refuses while their
    # response complies (`alignguard.self_screen`); the screen never sees which examples are poison.
    "self_screen": {"method": "lora", "peer": "self_screen"},
    # Both: the screen drops what would un-teach refusals, AlignGuard's penalty holds against the benign drift the
    # task itself causes (which no data screen can remove).
    "alignguard_screen": {"method": "alignguard", "peer": "self_screen"},
}
# A peer row's own options, overridable per row under the peer's name in the spec (`spec["asft"]`).
PEER_CONFIGS = {
    "asft": AsftConfig,
    "lox": LoxConfig,
    "surgery": SurgeryConfig,
    "lisa": LisaConfig,
    "self_screen": ScreenConfig,
}
DEFAULT_METHODS = list(METHODS)


# TrainRunConfig fields a method name may override for its own row (`plain_lora@poison_ratio=0`: the benign-drift
# control beside the poisoned rows).
TRAIN_OVERRIDES = ("poison_ratio",)


def method_spec(name: str) -> dict:
    """The spec of a method name. `<method>@<field>=<value>[,...]` overrides, for that row only, fields of
    AlignGuardConfig (a lambda sweep: `alignguard@lambda_a=1000`) and the TrainRunConfig fields in
    `TRAIN_OVERRIDES` (`plain_lora@poison_ratio=0`, `alignguard@poison_ratio=0.1,lambda_a=10`). Each value is
    converted like the flag of that field and must be valid there (poison_ratio in [0, 1), ...).

    A peer's row (`asft`, `lox`) also takes the fields of its `PEER_CONFIGS` class (`asft@asft_lambda=10`).

    Returns `{"method", "ag": {AlignGuardConfig overrides}, ...}`, plus `"train": {TrainRunConfig overrides}`
    when there are any and, for a peer, `spec[peer]`: {its config's overrides}.
    """
    import typing

    from ..config_values import convert_value  # the flags' converter, so `@lambda_a=abc` fails like `--lambda_a abc`

    base, _, overrides = name.partition("@")
    if base not in METHODS:
        raise ValueError(f"methods: unknown {base!r}; choose from {sorted(METHODS)} (optionally @field=value)")
    spec = {**METHODS[base], "ag": dict(METHODS[base].get("ag", {}))}
    train: dict = {}  # kept out of the spec when empty, so rows keyed before these overrides existed still match
    ag_fields = typing.get_type_hints(AlignGuardConfig)
    train_fields = typing.get_type_hints(TrainRunConfig)
    peer = spec.get("peer")
    peer_fields = typing.get_type_hints(PEER_CONFIGS[peer]) if peer else {}
    if peer:
        spec[peer] = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key in TRAIN_OVERRIDES:
            target, tp = train, train_fields[key]
        elif key in peer_fields:
            target, tp = spec[peer], peer_fields[key]
        elif key in ag_fields:
            target, tp = spec["ag"], ag_fields[key]
        else:
            target = tp = None
        if target is None or not value:
            own = f" or of {PEER_CONFIGS[peer].__name__}" if peer else ""
            raise ValueError(
                f"methods: {name!r}: expected @field=value with a field of AlignGuardConfig{own} or one of "
                f"{', '.join(TRAIN_OVERRIDES)}, got {item!r}"
            )
        try:
            target[key] = convert_value(value, tp)
        except ValueError as exc:
            raise ValueError(f"methods: {name!r}: {key}: {exc}") from exc
    try:
        AlignGuardConfig(**spec["ag"])
        TrainRunConfig(method="lora", **train)  # the training config's own checks (poison_ratio range)
        if peer:
            PEER_CONFIGS[peer](**spec[peer])
    except ValueError as exc:
        raise ValueError(f"methods: {name!r}: {exc}") from exc
    if train:
        spec["train"] = train
    return spec


def peer_config(name: str):
    """The peer's own config of a method name with its row's overrides (`AsftConfig`, `LoxConfig`); None for a
    method that is not a peer."""
    spec = method_spec(name)
    peer = spec.get("peer")
    return PEER_CONFIGS[peer](**spec[peer]) if peer else None


def method_train_config(train_cfg: TrainRunConfig, name: str) -> TrainRunConfig:
    """`train_cfg` with the method's own TrainRunConfig overrides (`@poison_ratio=...`) applied."""
    return replace(train_cfg, **method_spec(name).get("train", {}))


def is_plain_reference(name: str) -> bool:
    """Whether `name` is plain LoRA with at most training overrides (a valid drift-reduction reference)."""
    spec = method_spec(name)
    return name.partition("@")[0] == "plain_lora" and not spec["ag"]


def reference_method(name: str, poison_by_method: dict[str, float | None]) -> str | None:
    """The plain-LoRA row whose drift `name`'s drift reduction divides by: plain LoRA trained with the same poison
    ratio (`alignguard@poison_ratio=0` -> `plain_lora@poison_ratio=0`; `alignguard` -> `plain_lora`), so benign
    drift is compared with benign drift. `poison_by_method` maps the run's method names to their rows' poison
    ratios (None: unknown, a row written before the ratio was recorded; then only `plain_lora` is used).
    Returns None when the run has no such row."""
    own = poison_by_method.get(name)
    candidates = [m for m in poison_by_method if is_plain_reference(m)]
    if own is None:
        return "plain_lora" if "plain_lora" in candidates else None
    same = [m for m in candidates if poison_by_method[m] is not None and abs(poison_by_method[m] - own) < 1e-12]
    if "plain_lora" in same:
        return "plain_lora"
    return same[0] if same else None
