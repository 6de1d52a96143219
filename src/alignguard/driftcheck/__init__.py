"""DriftCheck: prompt sets, refusal judges and (alongside) generation, metrics and the eval runner."""

from alignguard.driftcheck.judge import EmbeddingJudge, Judge, PatternJudge, get_judge, is_refusal  # noqa: F401
