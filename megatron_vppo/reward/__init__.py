"""Answer reward: last `\\boxed{}` extraction and binary grading (mathruler by default, math-verify option)."""

from megatron_vppo.reward.boxed import EXTRACTIONS, extract_last_boxed
from megatron_vppo.reward.grade import BACKENDS, METHODS, Grader, batch_score, grade_answer_text, score

__all__ = [
    "BACKENDS",
    "EXTRACTIONS",
    "METHODS",
    "Grader",
    "batch_score",
    "extract_last_boxed",
    "grade_answer_text",
    "score",
]
