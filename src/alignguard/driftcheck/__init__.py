"""DriftCheck: prompt sets, refusal judges, batched generation, metrics and the eval runner."""

from alignguard.driftcheck.generate import GenerationSettings, generate_responses  # noqa: F401
from alignguard.driftcheck.judge import EmbeddingJudge, Judge, PatternJudge, get_judge, is_refusal  # noqa: F401
from alignguard.driftcheck.metrics import DriftCheckResult, drift_reduction_stat, drift_stat  # noqa: F401
from alignguard.driftcheck.prompts import PromptRecord, bundled_prompts, load_prompts  # noqa: F401
from alignguard.driftcheck.run import run_driftcheck  # noqa: F401
