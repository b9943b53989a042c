"""The benchmark's record of each model family, one module per family.

A module here is named as the family's adapter (``flashvlm/adapters/<family>.py``) and
holds its ``RECORD``: how to build synthetic inputs with the right number of placeholders,
how ``--scale`` shrinks its tower, and the analytic FLOPs of its vision side.
"""

from __future__ import annotations

from ...errors import FlashVLMError
from . import gemma3, idefics3, internvl, llava, llava_next, llava_next_video, llava_onevision, qwen3_vl, qwen_vl
from .shared import Family, SyntheticInputs

#: Each family's record, by the name of its module.
RECORDS: dict[str, Family] = {
    module.__name__.rsplit(".", 1)[1]: module.RECORD
    for module in (llava, llava_next, llava_onevision, qwen_vl, qwen3_vl, gemma3, internvl, idefics3, llava_next_video)
}

#: Each record by the ``model_type`` of the configs it drives.
BY_MODEL_TYPE: dict[str, Family] = {
    model_type: record for record in RECORDS.values() for model_type in record.model_types
}


def family_of(config) -> Family:
    """The benchmark's record for the family of ``config`` (by its ``model_type``)."""
    if config.model_type not in BY_MODEL_TYPE:
        raise FlashVLMError(f"model_type {config.model_type!r}: the benchmark knows {', '.join(sorted(BY_MODEL_TYPE))}")
    return BY_MODEL_TYPE[config.model_type]


__all__ = ["BY_MODEL_TYPE", "RECORDS", "Family", "SyntheticInputs", "family_of"]
