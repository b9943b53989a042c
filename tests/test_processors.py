"""The real InternVL, SmolVLM/Idefics3 and Qwen3-VL processors without torchvision, pool on
multi-tile images, and the sequence helpers these families lean on.

Each family is saved as a Hugging Face folder (its tiny model and its real processor class,
built locally) and loaded back through ``flashvlm.loading.load_model``, as a user would.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from conftest_families import (
    EVERY_CASE,
    build_tiny_idefics3,
    tiny_idefics3_processor,
    tiny_internvl_processor,
    tiny_qwen3_vl_processor,
    tiny_smolvlm_processor,
)
from PIL import Image

import flashvlm
from flashvlm import FlashVLMError
from flashvlm.adapters.sequence import pad_token_id
from flashvlm.loading import chat_prompt, load_model

CASES = {case.name: case for case in EVERY_CASE}
#: family -> (its real processor built locally, the processor class, its tokens for one wide image).
REAL_PROCESSORS = {
    "internvl": (tiny_internvl_processor, "InternVLProcessor", 48),  # 2 tiles + the thumbnail, 16 each
    "idefics3": (tiny_idefics3_processor, "Idefics3Processor", 80),  # 2 x 2 sub-images + the global view
    "smolvlm": (tiny_smolvlm_processor, "SmolVLMProcessor", 80),
    "qwen3_vl": (tiny_qwen3_vl_processor, "Qwen3VLProcessor", 60),  # resized to 24 x 40 px: 12 x 20 patches
}
QUESTION = "what is the color of the circle ?"


@pytest.fixture(scope="module")
def wide_image():
    generator = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (40, 70, 3), generator=generator, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """family -> a folder holding its tiny model and its real processor, saved on first use."""
    folders = {}

    def folder_of(name: str):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(f"real-{name}")
            tiny_model(CASES[name]).save_pretrained(folders[name])
            REAL_PROCESSORS[name][0]().save_pretrained(folders[name])
        return folders[name]

    return folder_of


@pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
def test_a_family_folder_loads_its_real_processor_and_prunes(name, family_folder, wide_image):
    _, class_name, num_tokens = REAL_PROCESSORS[name]
    model, processor = load_model(family_folder(name), device="cpu")
    assert isinstance(processor, getattr(transformers, class_name)) and type(processor).__name__ == class_name
    inputs = processor(images=[wide_image], text=[chat_prompt(processor, QUESTION)], return_tensors="pt")
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        with flashvlm.prune(model, budget=10_000):
            assert torch.equal(model.generate(**inputs, **settings), expected)
        with flashvlm.prune(model, budget=8) as pruner:
            assert model.generate(**inputs, **settings).shape == expected.shape
        with flashvlm.prune(model, 8, "flashvlm:question", tokenizer=processor) as asked:
            model.generate(**inputs, question=[QUESTION], **settings)
    assert [(record.num_tokens, record.num_kept) for record in pruner.last.images] == [(num_tokens, 8)]
    assert [record.num_kept for record in asked.last.images] == [8]


@pytest.mark.parametrize("name", ["internvl", "smolvlm", "qwen3_vl"])  # Idefics3's processor takes no videos
def test_a_family_folder_refuses_videos_in_one_line(name, family_folder):
    _, processor = load_model(family_folder(name), device="cpu")
    frames = [Image.new("RGB", (32, 32), "red")] * 2
    with pytest.raises(FlashVLMError, match="loaded without its video processor because torchvision") as caught:
        processor(videos=[frames], text=["<video>"], return_tensors="pt")
    assert "\n" not in str(caught.value)


def test_a_smolvlm_folder_without_num2words_names_what_to_install(family_folder, monkeypatch):
    import flashvlm.loading

    folder = family_folder("smolvlm")
    real_find_spec = flashvlm.loading.find_spec
    monkeypatch.setattr(
        flashvlm.loading, "find_spec", lambda package: None if package == "num2words" else real_find_spec(package)
    )
    with pytest.raises(FlashVLMError) as caught:
        load_model(folder, device="cpu")
    assert str(caught.value) == (
        f'the processor of {folder} (SmolVLMProcessor) needs the num2words package: pip install "flashvlm[smolvlm]"'
    )


def test_the_pad_id_comes_from_the_language_models_config_first():
    model = build_tiny_idefics3(model_type="smolvlm")
    # SmolVLM's top-level pad id is a deprecated placeholder; the text config holds the real one.
    model.config.pad_token_id, model.config.text_config.pad_token_id = 9, 5
    assert pad_token_id(model) == 5
    model.config.text_config.pad_token_id = None
    assert pad_token_id(model) == 9
