"""Every supported family loads from a saved folder (model + processor) and runs through
``flashvlm generate`` in the project's own environment, which has no torchvision."""

from __future__ import annotations

import json

import pytest
from families.llava import build_tiny_llava, tiny_llava_processor
from families.llava_next import build_tiny_llava_next, tiny_llava_next_processor
from families.llava_onevision import build_tiny_llava_onevision, tiny_llava_onevision_processor
from families.qwen_vl import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    tiny_qwen2_5_vl_processor,
    tiny_qwen_vl_processor,
)
from transformers.utils import is_torchvision_available

from flashvlm.cli import main
from flashvlm.errors import FlashVLMError
from flashvlm.loading import load_model

#: family -> (tiny model builder, its processor as the real checkpoints' (PIL image processors,
#: built without their video processor here), the video processor class its real folders name, or None)
FAMILIES = {
    "llava": (build_tiny_llava, tiny_llava_processor, None),
    "llava_next": (build_tiny_llava_next, tiny_llava_next_processor, None),
    "llava_onevision": (build_tiny_llava_onevision, tiny_llava_onevision_processor, "LlavaOnevisionVideoProcessor"),
    "qwen2_vl": (build_tiny_qwen2_vl, tiny_qwen_vl_processor, "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": (build_tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor, "Qwen2VLVideoProcessor"),
}


def save_family(family: str, folder):
    """Save the tiny model and processor of ``family`` in ``folder``, as ``save_pretrained`` in an
    environment with torchvision would: the processor config then holds a video processor too."""
    build, processor, video_processor_type = FAMILIES[family]
    build().save_pretrained(folder)
    processor().save_pretrained(folder)
    if video_processor_type is not None:
        config_file = folder / "processor_config.json"
        config = json.loads(config_file.read_text())
        config["video_processor"] = {"video_processor_type": video_processor_type, "merge_size": 2, "patch_size": 2}
        config_file.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_from_a_saved_folder(family, tmp_path, sample_image_file, capsys):
    folder = save_family(family, tmp_path)
    if FAMILIES[family][2] is not None and not is_torchvision_available():
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
