"""flashvlm as an lmms-eval model: ``python -m lmms_eval --model flashvlm ...``.

lmms-eval (0.7+) discovers external models through the Python entry-point group
``lmms_eval.models``; flashvlm's ``pyproject.toml`` declares :func:`manifest` there, so
``pip install flashvlm[eval]`` is all the registration there is. The model class lives
in :mod:`.model` and is imported by lmms-eval only when ``--model flashvlm`` is asked
for; :mod:`.jsonl_task` turns a local JSONL dataset into an lmms-eval task.

This module imports nothing from lmms-eval at import time.
"""

from __future__ import annotations

#: The name lmms-eval knows the model by (``--model flashvlm``).
MODEL_ID = "flashvlm"
#: Import path of the lmms-eval model class.
MODEL_CLASS_PATH = "flashvlm.integrations.lmms_eval.model.PrunedVLM"


def manifest():
    """The entry point lmms-eval calls: flashvlm's model manifest for its registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)


def register() -> None:
    """Register the model in the running lmms-eval without the entry point.

    For a source checkout used through ``PYTHONPATH`` (no installed metadata, so no
    entry points); an installed flashvlm never needs this.
    """
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
