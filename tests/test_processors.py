"""The real InternVL, SmolVLM/Idefics3 and Qwen3-VL processors without torchvision, pool on
multi-tile images, and the sequence helpers these families lean on.

Each family is saved as a Hugging Face folder (its tiny model and its real processor class,
built locally) and loaded back through ``flashvlm.loading.load_model``, as a user would.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from families import case_named, tiny_model
from families.idefics3 import (
    build_tiny_idefics3,
    idefics3_image_prompt,
    tiny_idefics3_processor,
    tiny_smolvlm_processor,
)
from families.internvl import INTERNVL_END_ID, INTERNVL_START_ID, tiny_internvl_processor
from families.qwen3_vl import tiny_qwen3_vl_processor
from families.shared import IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID
from PIL import Image

import flashvlm
from flashvlm import FlashVLMError
from flashvlm.adapters.sequence import pad_token_id
from flashvlm.loading import chat_prompt, load_model

#: family -> (its real processor built locally, the processor class, the prompt tokens it writes
#: for one 40 x 70 px image: the layout the hand-built batches of families/ use).
REAL_PROCESSORS = {
    # 2 tiles + the thumbnail, 16 tokens each, between <img> and </img>.
    "internvl": (
        tiny_internvl_processor,
        "InternVLProcessor",
        [INTERNVL_START_ID, *[IMAGE_TOKEN_ID] * 48, INTERNVL_END_ID],
    ),
    # A 2 x 2 split with its row/column markers, then the global view.
    "idefics3": (tiny_idefics3_processor, "Idefics3Processor", idefics3_image_prompt(2, 2)),
    "smolvlm": (tiny_smolvlm_processor, "SmolVLMProcessor", idefics3_image_prompt(2, 2)),
    # Resized to 24 x 40 px: 12 x 20 patches merged 2 x 2.
    "qwen3_vl": (tiny_qwen3_vl_processor, "Qwen3VLProcessor", [VISION_START_ID, *[IMAGE_TOKEN_ID] * 60, VISION_END_ID]),
}
QUESTION = "what is the color of the circle ?"


@pytest.fixture(scope="module")
def wide_image():
    generator = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (40, 70, 3), generator=generator, dtype=torch.uint8).numpy())


#: The video processor a folder saved with torchvision names, per family that has one.
VIDEO_PROCESSOR_TYPES = {
    "internvl": "InternVLVideoProcessor",
    "smolvlm": "SmolVLMVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """family -> a folder holding its tiny model and its real processor, saved on first use as
    ``save_pretrained`` with torchvision would save it: naming a video processor too."""
    folders = {}

    def folder_of(name: str):
        if name not in folders:
            folder = folders[name] = tmp_path_factory.mktemp(f"real-{name}")
            tiny_model(case_named(name)).save_pretrained(folder)
            REAL_PROCESSORS[name][0]().save_pretrained(folder)
            if name in VIDEO_PROCESSOR_TYPES:
                config = json.loads((folder / "processor_config.json").read_text())
                config["video_processor"] = {"video_processor_type": VIDEO_PROCESSOR_TYPES[name]}
                (folder / "processor_config.json").write_text(json.dumps(config))
        return folders[name]

    return folder_of


@pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
def test_a_family_folder_loads_its_real_processor_and_prunes_a_padded_batch(name, family_folder, wide_image):
    _, class_name, image_layout = REAL_PROCESSORS[name]
    model, processor = load_model(family_folder(name), device="cpu")
    assert isinstance(processor, getattr(transformers, class_name)) and type(processor).__name__ == class_name
    # Two rows of different lengths: the wide image, then a small square one with a longer question.
    questions = [QUESTION, "how many red circle , green circle , blue circle ?"]
    images = [[wide_image], [Image.new("RGB", (24, 24), "red")]]
    text = [chat_prompt(processor, question) for question in questions]
    inputs = processor(images=images, text=text, padding=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert any(ids[start : start + len(image_layout)] == image_layout for start in range(len(ids)))
    assert ids.count(IMAGE_TOKEN_ID) == image_layout.count(IMAGE_TOKEN_ID)  # the layout is row 0's only image
    tokens_per_row = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert inputs["attention_mask"].min() == 0  # the rows are padded
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        with flashvlm.prune(model, budget=10_000):
            assert torch.equal(model.generate(**inputs, **settings), expected)
        with flashvlm.prune(model, budget=8) as pruner:
            assert model.generate(**inputs, **settings).shape == expected.shape
        with flashvlm.prune(model, 8, "flashvlm:question", tokenizer=processor) as asked:
            model.generate(**inputs, question=questions, **settings)
        with flashvlm.prune(model, 8, "pool") as pooled:  # tiled images: each tile its own raster
            model.generate(**inputs, **settings)
    for run in (pruner, asked, pooled):
        assert [(record.num_tokens, record.num_kept) for record in run.last.images] == [(n, 8) for n in tokens_per_row]


@pytest.mark.parametrize("name", sorted(VIDEO_PROCESSOR_TYPES))  # Idefics3's processor takes no videos
def test_a_family_folder_refuses_videos_in_one_line(name, family_folder):
    from transformers import AutoProcessor

    with pytest.raises(ImportError, match="Torchvision"):  # what a plain from_pretrained meets here
        AutoProcessor.from_pretrained(family_folder(name))
    _, processor = load_model(family_folder(name), device="cpu")
    frames = [Image.new("RGB", (32, 32), "red")] * 2
    with pytest.raises(FlashVLMError, match="loaded without its video processor because torchvision") as caught:
        processor(videos=[frames], text=["<video>"], return_tensors="pt")
    assert "\n" not in str(caught.value)


def test_a_smolvlm_folder_without_num2words_names_what_to_install(family_folder, monkeypatch):
    folder = family_folder("smolvlm")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda package, *a: None if package == "num2words" else real_find_spec(package, *a)
    )
    with pytest.raises(FlashVLMError) as caught:
        load_model(folder, device="cpu")
    assert str(caught.value) == (
        f'the processor of {folder} (SmolVLMProcessor) needs the num2words package: pip install "flashvlm[smolvlm]"'
    )


@pytest.mark.parametrize("name", ["internvl", "smolvlm"])
def test_pool_averages_each_tile_of_a_multi_tile_image_on_its_own_raster(name):
    case = case_named(name)
    model = tiny_model(case)
    inputs = case.make_inputs(model, 1, 0)  # one image: two tiles and the global view, 16 tokens each
    with flashvlm.prune(model, budget=12, method="pool") as pruner, torch.no_grad():
        pruned = pruner.prune_inputs(dict(inputs))
        logits = model(**inputs).logits
        (item,) = flashvlm.adapter_for(model).visual_items(dict(inputs), frozenset({"grid"}))
    (record,) = pruned.images
    assert (record.num_tokens, record.num_kept) == (48, 12) and torch.isfinite(logits).all()
    assert [(region.positions.numel(), region.grid_shape, region.budget) for region in record.regions] == [
        (16, (4, 4), 4)
    ] * 3
    # Each view's 4 x 4 raster is pooled to 2 x 2 cells, each sent as one token at its centre.
    views = item.features.view(3, 4, 4, -1).permute(0, 3, 1, 2)  # (V, C, 4, 4)
    cells = torch.nn.functional.adaptive_avg_pool2d(views, (2, 2)).flatten(2).transpose(1, 2)  # (V, 4, C)
    with torch.no_grad():
        expected = flashvlm.adapter_for(model).project(cells.flatten(0, 1))  # (12, D)
    sent = pruned.model_kwargs["mm_encoder_outputs"]["image"].pooler_output
    sent = torch.cat(list(sent)) if isinstance(sent, (list, tuple)) else sent.flatten(0, -2)
    torch.testing.assert_close(sent, expected, atol=1e-5, rtol=0)
    centres = torch.tensor([0, 2, 8, 10])  # each 2 x 2 cell's centre token (rounded down) in its view's raster
    assert record.keep_indices.tolist() == torch.cat([centres + 16 * view for view in range(3)]).tolist()


def test_the_pad_id_comes_from_the_language_models_config_first():
    model = build_tiny_idefics3(model_type="smolvlm")
    # SmolVLM's top-level pad id is a deprecated placeholder; the text config holds the real one.
    model.config.pad_token_id, model.config.text_config.pad_token_id = 9, 5
    assert pad_token_id(model) == 5
    model.config.text_config.pad_token_id = None
    assert pad_token_id(model) == 9
