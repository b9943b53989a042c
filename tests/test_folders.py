"""Every supported family loads from a saved folder (model + processor) and runs through
``flashvlm generate`` in the project's own environment, which has no torchvision."""

from __future__ import annotations

import json

import pytest
from conftest import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    LLAVA_CHAT_TEMPLATE,
    PATCH_SIZE,
    QWEN_PATCH,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    tiny_processor,
)
from transformers.utils import is_torchvision_available

from flashvlm._torchvision_compat import without_video_processor
from flashvlm.cli import main
from flashvlm.errors import FlashVLMError
from flashvlm.loading import load_model


def tiny_tokenizer():
    """The tiny LLaVA tokenizer, with video tokens of its own so that no prompt word maps to one."""
    tokenizer = tiny_processor().tokenizer
    tokenizer.add_tokens(["<video>", "<|video_pad|>"], special_tokens=True)
    return tokenizer


def family_processor(family: str):
    """A processor for the tiny model of ``family``, built as its real checkpoints' are (PIL image
    processors; the ones that hold a video processor are built without it, as they must be here)."""
    from transformers import (
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    if family == "llava":
        return tiny_processor()
    common = dict(tokenizer=tiny_tokenizer(), chat_template=LLAVA_CHAT_TEMPLATE)
    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    if family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=ANYRES_PINPOINTS, size={"shortest_edge": ANYRES_TILE}, crop_size=tile
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            **common,
        )
    if family == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=ANYRES_PINPOINTS, size=tile)
        return without_video_processor(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            num_image_tokens=(ANYRES_TILE // PATCH_SIZE) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
            **common,
        )
    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 1024}
    )
    return without_video_processor(processor_class)(image_processor=image_processor, **common)


#: family -> (tiny model builder, the video processor class its real folders name, or None)
FAMILIES = {
    "llava": (build_tiny_llava, None),
    "llava_next": (build_tiny_llava_next, None),
    "llava_onevision": (build_tiny_llava_onevision, "LlavaOnevisionVideoProcessor"),
    "qwen2_vl": (build_tiny_qwen2_vl, "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": (build_tiny_qwen2_5_vl, "Qwen2VLVideoProcessor"),
}


def save_family(family: str, folder):
    """Save the tiny model and processor of ``family`` in ``folder``, as ``save_pretrained`` in an
    environment with torchvision would: the processor config then holds a video processor too."""
    build, video_processor_type = FAMILIES[family]
    build().save_pretrained(folder)
    family_processor(family).save_pretrained(folder)
    if video_processor_type is not None:
        config_file = folder / "processor_config.json"
        config = json.loads(config_file.read_text())
        config["video_processor"] = {"video_processor_type": video_processor_type, "merge_size": 2, "patch_size": 2}
        config_file.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_from_a_saved_folder(family, tmp_path, sample_image_file, capsys):
    folder = save_family(family, tmp_path)
    if FAMILIES[family][1] is not None and not is_torchvision_available():
        from transformers import AutoProcessor

        with pytest.raises(ImportError, match="Torchvision"):  # what a plain from_pretrained meets here
            AutoProcessor.from_pretrained(folder)
    arguments = ["--image", str(sample_image_file), "--prompt", "what is the color ?", "--budget", "4"]
    code = main(["generate", "--model", str(folder), *arguments, "--max-new-tokens", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("answer:") and "image 1: kept 4 of" in out


@pytest.mark.skipif(is_torchvision_available(), reason="torchvision is installed: the video processor loads")
def test_a_processor_loaded_without_torchvision_refuses_videos_and_says_why(tmp_path):
    _model, processor = load_model(str(save_family("qwen2_vl", tmp_path)), device="cpu")
    assert type(processor).__name__ == "Qwen2VLProcessor" and not hasattr(processor, "video_processor")
    with pytest.raises(FlashVLMError, match="video inputs need torchvision"):
        processor(text="<video>", videos=[[[[0]]]])
