"""Reference-exact benchmark metrics: caption scores via pycocoevalcap's scorers, VQA by the official rule."""

from vlmbatch.evaluation.metrics.captions import (
    CAPTION_METRICS,
    SCORE_NAMES,
    CaptionScores,
    ptb_tokenize,
    score_captions,
)
from vlmbatch.evaluation.metrics.spice import (
    SpiceResult,
    SpiceRunner,
    SpiceUnavailable,
    find_corenlp_jars,
    provision_corenlp,
)
from vlmbatch.evaluation.metrics.vqa import (
    VqaAnnotation,
    VqaScores,
    normalize_answer,
    question_accuracy,
    score_vqa,
)

__all__ = [
    "CAPTION_METRICS",
    "SCORE_NAMES",
    "CaptionScores",
    "SpiceResult",
    "SpiceRunner",
    "SpiceUnavailable",
    "VqaAnnotation",
    "VqaScores",
    "find_corenlp_jars",
    "normalize_answer",
    "provision_corenlp",
    "ptb_tokenize",
    "question_accuracy",
    "score_captions",
    "score_vqa",
]
