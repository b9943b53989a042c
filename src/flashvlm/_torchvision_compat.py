"""Processors that serve images without torchvision.

The Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors hold a video processor, and
transformers' video processors need torchvision, which flashvlm's CPU environment lacks on
purpose (PyPI's build is CUDA-only and breaks the CPU torch). Their image processors have a
PIL backend, so images need no torchvision at all: :func:`without_video_processor` gives
the processor class minus its video processor, loaded and used exactly like the original
for images, and refusing videos with a message that says why. No installed file and no
transformers registry is changed.
"""

from __future__ import annotations

import functools

from .errors import FlashVLMError

#: The processor attribute that needs torchvision.
VIDEO_PROCESSOR = "video_processor"


def needs_torchvision(processor_class: type) -> bool:
    """Whether ``processor_class`` loads a video processor, which torchvision must be installed for."""
    from transformers.utils import is_torchvision_available

    return VIDEO_PROCESSOR in processor_class.get_attributes() and not is_torchvision_available()


@functools.cache
def without_video_processor(processor_class: type) -> type:
    """A subclass of a ``ProcessorMixin`` class that neither loads nor checks a video processor.

    transformers derives what a processor loads (``from_pretrained``), checks (``__init__``)
    and saves from ``get_attributes()``; leaving the video processor out there is enough.
    The subclass keeps the original's name, so a folder it saves names the original class.
    """

    class ProcessorWithoutVideo(processor_class):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != VIDEO_PROCESSOR]

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise FlashVLMError(
                    f"{processor_class.__name__} was loaded without its video processor because torchvision is "
                    "not installed: video inputs need torchvision (a build matching your torch); images work"
                )
            return super().__call__(images=images, text=text, **kwargs)

    ProcessorWithoutVideo.__name__ = ProcessorWithoutVideo.__qualname__ = processor_class.__name__
    ProcessorWithoutVideo.__doc__ = f"{processor_class.__name__} for images only (torchvision is not installed)."
    return ProcessorWithoutVideo
