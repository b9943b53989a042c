"""Processors that serve images without torchvision.

The Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and SmolVLM processors hold
a video processor, and transformers' video processors need torchvision, which flashvlm's
CPU environment lacks on purpose (PyPI's build is CUDA-only and breaks the CPU torch).
Their image processors have a PIL backend, so images need no torchvision at all:
:func:`without_video_processor` gives the processor class minus its video processor,
built, loaded, saved and used exactly like the original for images, and refusing videos
with a message that says why. No installed file and no transformers registry is changed.
"""

from __future__ import annotations

import functools
import inspect

from .errors import FlashVLMError

#: The processor attribute that needs torchvision.
VIDEO_PROCESSOR = "video_processor"


def needs_torchvision(processor_class: type) -> bool:
    """Whether ``processor_class`` loads a video processor, which torchvision must be installed for."""
    from transformers.utils import is_torchvision_available

    return VIDEO_PROCESSOR in processor_class.get_attributes() and not is_torchvision_available()


def video_refusal(processor_name: str) -> str:
    """The one line a processor loaded without its video processor answers a video with."""
    return (
        f"{processor_name} was loaded without its video processor because torchvision is not installed: "
        "video inputs need torchvision (a build matching your torch); images work"
    )


class NoVideoProcessor:
    """Stands where the video processor would be. A processor may read its defaults while
    rendering a chat template (SmolVLM's reads ``num_frames`` and ``fps``): they are None, as
    for a video processor without defaults. Any other attribute is absent (transformers
    probes a few with ``getattr(..., default)``), with the refusal as the reason; a call is
    refused."""

    num_frames = None
    fps = None

    def __init__(self, processor_name: str) -> None:
        self.processor_name = processor_name

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy and pickle probe dunders before __init__ has run
            raise AttributeError(name)
        raise AttributeError(f"{name}: {video_refusal(self.__dict__.get('processor_name', 'the processor'))}")

    def __call__(self, *args, **kwargs):
        raise FlashVLMError(video_refusal(self.processor_name))


@functools.cache
def without_video_processor(processor_class: type) -> type:
    """A subclass of a ``ProcessorMixin`` class that neither loads nor checks a video processor.

    transformers derives what a processor loads (``from_pretrained``), checks (``__init__``)
    and saves from ``get_attributes()``; leaving the video processor out there is enough.
    Where the original requires one, a :class:`NoVideoProcessor` holds its place. Videos are
    refused in one line.
    The subclass keeps the original's name, so a folder it saves names the original class.
    """
    # Where the original's __init__ requires a video processor, if it does (counting after self).
    parameters = inspect.signature(processor_class.__init__).parameters
    video_parameter = parameters.get(VIDEO_PROCESSOR)
    required_at = None
    if video_parameter is not None and video_parameter.default is inspect.Parameter.empty:
        required_at = list(parameters).index(VIDEO_PROCESSOR) - 1

    class ProcessorWithoutVideo(processor_class):
        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            # from_pretrained loads only what get_attributes() lists; an original that requires
            # the video processor (SmolVLM's) gets None in its place.
            if required_at is not None and len(args) == required_at:
                args = [*args, None]
            return super().from_args_and_dict(args, processor_dict, **kwargs)

        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != VIDEO_PROCESSOR]

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise FlashVLMError(video_refusal(processor_class.__name__))
            return super().__call__(images=images, text=text, **kwargs)

    if required_at is not None:
        # An original that requires a video processor may read it outside videos too
        # (SmolVLM's chat template reads its defaults): a stand-in holds its place.
        ProcessorWithoutVideo.video_processor = NoVideoProcessor(processor_class.__name__)
    ProcessorWithoutVideo.__name__ = ProcessorWithoutVideo.__qualname__ = processor_class.__name__
    ProcessorWithoutVideo.__doc__ = f"{processor_class.__name__} for images only (torchvision is not installed)."
    return ProcessorWithoutVideo
