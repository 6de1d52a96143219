"""DriftCheck: prompt sets, refusal judges and (alongside) generation, metrics and the eval runner."""

from alignguard.driftcheck.judge import EmbeddingJudge, Judge, PatternJudge, get_judge, is_refusal  # noqa: F401
from alignguard.driftcheck.prompts import PromptRecord, bundled_prompts, load_alignment_data, load_prompts  # noqa: F401
