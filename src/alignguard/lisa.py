"""Lisa: bi-state optimisation with a proximal term against harmful fine-tuning.

"Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack" (Huang et al., NeurIPS
2024, arXiv 2405.18641). Fine-tuning alternates between two states. In the *alignment* state the optimizer steps on
alignment data (unsafe prompts with refusals). In the *fine-tune* state it steps on the user's data. In both
states the loss carries a proximal term that holds the weights near where the other state left them:

    loss = L_state(w) + (rho / 2) * ||w - w_switch||²      (w: the trainable LoRA parameters)

with w_switch the weights at the most recent switch of state. The alignment steps pull the adapter back towards
refusing; the proximal term stops the next fine-tune phase from undoing that in a few steps.

Followed: git-disl/Lisa, `trainer.py` (`ADMMTrainer.check_mode` / `switch_model`: the switch and the snapshot,
no proximal term in the first 10% of the steps, where the paper's GSM8K runs did not converge) and
`script/finetune/lisa_poison_ratio.sh` (rho = 1, 100 alignment and 900 fine-tune steps a cycle). Our own code,
with these differences:
- The states are counted in optimizer steps, not micro-batches, and follow from the step number alone
  (`lisa_phase`), so a resumed run is in the state the killed run would have been in.
- The proximal term is added once per optimizer step (on the micro-batch that syncs gradients, weighted to undo the
  Trainer's 1/GA scaling), as the AsFT and AlignGuard terms are. The paper's loop adds it to every micro-batch,
  which agrees at GA = 1, the setting of all its scripts.
- The alignment steps are part of `max_steps`, as in the paper (its epochs count both states), so a Lisa row sees
  `lisa_finetune_steps / cycle` of plain LoRA's task batches.

Components only: the trainer is `alignguard.recipes.lisa.LisaTrainer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config_values import require_whole_number

ALIGNMENT, FINETUNE = "alignment", "finetune"


@dataclass
class LisaConfig:
    """Options of the Lisa rows (`lisa`; per row: `lisa@lisa_rho=10`).

    Args:
        lisa_alignment_steps / lisa_finetune_steps: optimizer steps of each state in one cycle; a cycle starts in
            the alignment state. Defaults 1 and 9: the paper's 100 : 900, in cycles that fit a 30-step run
            three times.
        lisa_rho: weight of the proximal term (rho / 2) * ||w - w_switch||². Default 1.0: the paper's value. Its
            effect depends on the learning rate and the size of the adapter, so sweep it per model
            (`lisa@lisa_rho=...`).
        lisa_warmup_fraction: share of `max_steps` at the start without the proximal term (the paper: 0.1).
    """

    lisa_alignment_steps: int = field(default=1, metadata={"help": "Alignment-state optimizer steps per cycle."})
    lisa_finetune_steps: int = field(default=9, metadata={"help": "Fine-tune-state optimizer steps per cycle."})
    lisa_rho: float = field(
        default=1.0, metadata={"help": "Weight rho of the proximal term rho/2 ||w - w_switch||^2."}
    )
    lisa_warmup_fraction: float = field(
        default=0.1, metadata={"help": "Share of max_steps at the start without the proximal term."}
    )

    def __post_init__(self):
        require_whole_number(self, ("lisa_alignment_steps", "lisa_finetune_steps"))
        if not self.lisa_rho >= 0:  # also refuses NaN
            raise ValueError(f"lisa_rho: must be >= 0, got {self.lisa_rho}")
        if not 0 <= self.lisa_warmup_fraction < 1:
            raise ValueError(f"lisa_warmup_fraction: must be in [0, 1), got {self.lisa_warmup_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def lisa_phase(step: int, config: LisaConfig) -> str:
    """The state of optimizer step `step` (0-based): the first `lisa_alignment_steps` of every cycle align."""
    cycle = config.lisa_alignment_steps + config.lisa_finetune_steps
    return ALIGNMENT if step % cycle < config.lisa_alignment_steps else FINETUNE


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_switch||² summed over the parameters (a scalar in the first parameter's dtype, with its graph)."""
    total = sum(((p - a.to(device=p.device, dtype=p.dtype)) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return torch.as_tensor(total, dtype=params[0].dtype, device=params[0].device)
