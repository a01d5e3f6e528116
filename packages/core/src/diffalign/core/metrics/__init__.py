"""Metrics: FID/KID, CLIPScore and preference-model adapters, DSG/TIFA scoring, preference accuracy.

| submodule          | contents                                                                      |
|--------------------|-------------------------------------------------------------------------------|
| ``fid``            | ``frechet_distance``, ``fid_from_features``, ``FeatureStats``, ``make_fid``/``make_kid`` |
| ``scorers``        | ``CLIPScore``, ``PickScore``, ``HPSv2``, ``AestheticScore``, ``ImageRewardScore`` (reward models) |
| ``dsg``            | ``Question``, ``dsg_score``, ``tifa_score``, ``aggregate_dsg``, ``score_with_backend`` |
| ``preference``     | ``ranking_accuracy`` (ImageReward tie rule), ``inversion_score``, ``vote_accuracy`` |
| ``preference_data``| ``PreferenceRecord``; readers/writers for the ImageReward, HPDv2 and Rapidata formats |

Names are resolved lazily (``from diffalign.core.metrics import dsg_score`` imports only ``dsg``), so
reading a preference file does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fid": [
        "FeatureExtractor",
        "FeatureStats",
        "feature_statistics",
        "fid_from_features",
        "fid_from_stats",
        "frechet_distance",
        "kid_from_features",
        "make_fid",
        "make_kid",
    ],
    "scorers": [
        "AestheticScore",
        "CLIPScore",
        "HPSv2",
        "ImageRewardScore",
        "PickScore",
        "clip_score",
        "make_clip_score_metric",
    ],
    "dsg": [
        "DSGResult",
        "Question",
        "VQABackend",
        "aggregate_dsg",
        "dsg_score",
        "score_with_backend",
        "tifa_score",
    ],
    "preference": [
        "AccuracyResult",
        "VoteAccuracy",
        "bootstrap_interval",
        "inversion_score",
        "pairwise_accuracy",
        "ranking_accuracy",
        "vote_accuracy",
        "wilson_interval",
    ],
    "preference_data": [
        "PreferenceDataError",
        "PreferencePair",
        "PreferenceRecord",
        "read_hpdv2",
        "read_imagereward",
        "read_preferences",
        "read_rapidata",
        "records_to_pairs",
        "write_hpdv2",
        "write_imagereward",
        "write_preferences",
        "write_rapidata",
    ],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'diffalign.core.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
