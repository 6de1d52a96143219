"""alignguard: LoRA fine-tuning that keeps safety alignment (AlignGuard-LoRA), DriftCheck and R-Capsule."""

from .config import AlignGuardConfig, FisherConfig, SubspaceConfig
from .data import make_batches, tokenize_example
from .fisher import FisherMismatchError, FisherState, estimate_fisher, load_fisher, save_fisher
from .projection import attach_projection_hooks, detach_projection_hooks, project_lora_weights_
from .regularizers import AlignGuardRegularizer, alignment_fraction, dense_reference_terms, regularization_terms
from .subspace import AlignmentSubspaces, Subspace, build_subspaces, random_subspaces

__version__ = "0.1.0"


def __getattr__(name):
    # The trainers import transformers.Trainer (seconds); load them only when asked for.
    if name in ("AlignGuardTrainer", "AlignGuardMixin", "AlignGuardSFTTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'alignguard' has no attribute {name!r}")


__all__ = [
    "AlignGuardConfig",
    "AlignGuardMixin",
    "AlignGuardRegularizer",
    "AlignGuardSFTTrainer",
    "AlignGuardTrainer",
    "AlignmentSubspaces",
    "FisherConfig",
    "FisherMismatchError",
    "FisherState",
    "Subspace",
    "SubspaceConfig",
    "alignment_fraction",
    "attach_projection_hooks",
    "build_subspaces",
    "dense_reference_terms",
    "detach_projection_hooks",
    "estimate_fisher",
    "load_fisher",
    "make_batches",
    "project_lora_weights_",
    "random_subspaces",
    "regularization_terms",
    "save_fisher",
    "tokenize_example",
]
