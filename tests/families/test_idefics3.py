"""Idefics3 and SmolVLM: sub-images forming images with their markers kept, saliency against
the tower's own attention maps, clear errors on mismatched prompts, and a saved folder through
the command line."""

from __future__ import annotations

import pytest
import torch

import flashvlm
from flashvlm import FlashVLMError
from flashvlm.adapters import adapter_for

from . import case_named, tiny_model
from .idefics3 import GLOBAL_IMAGE_ID, IDEFICS3_SPLITS, build_tiny_idefics3, tiny_idefics3_processor
from .shared import IMAGE_TOKEN_ID, TOKENS_PER_TILE, reference_attention

IDEFICS3 = case_named("idefics3")


def test_idefics3_prompts_that_do_not_match_the_sub_images_are_a_clear_error():
    model = tiny_model(IDEFICS3)
    inputs = IDEFICS3.make_inputs(model, 1, 0)  # one image split 1 x 2: three sub-images
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:, :2], pixel_attention_mask=None)
    with flashvlm.prune(model, budget=4), pytest.raises(FlashVLMError, match="do not match the 2 sub-images"):
        model(**fewer)
    last_marker = inputs["input_ids"] == GLOBAL_IMAGE_ID
    two_rows = {
        name: torch.cat([value, value.masked_fill(last_marker, 5) if name == "input_ids" else value])
        for name, value in inputs.items()
    }
    with flashvlm.prune(model, budget=4), pytest.raises(FlashVLMError, match="do not all end with the same marker"):
        model(**two_rows)


@pytest.mark.parametrize("scale_factor", [2, 4])
def test_idefics3_saliency_is_the_attention_received_averaged_over_each_shuffle_group(scale_factor):
    model = build_tiny_idefics3(model_type="smolvlm", scale_factor=scale_factor)
    inputs = IDEFICS3.make_inputs(model, 1, 0)
    adapter = adapter_for(model)
    stack = adapter.encode_sub_images(inputs, frozenset({"saliency"}))
    pixel_values = inputs["pixel_values"][0]  # one row, every sub-image real
    attention = reference_attention(model.model.vision_model, pixel_values, layer=-1)
    received = attention.sum(dim=2).mean(dim=1)  # (R, n)
    torch.testing.assert_close(stack.saliency, adapter.group_mean(received[..., None]).squeeze(-1))
    # One score per language-model token: the 8 x 8 patch raster shuffled by the scale factor.
    assert stack.saliency.shape == (received.shape[0], 64 // scale_factor**2)


def test_idefics3_sub_images_form_images_and_markers_stay():
    model = tiny_model(IDEFICS3)
    inputs = IDEFICS3.make_inputs(model, 3, 0)
    with flashvlm.prune(model, budget=5) as pruner:
        pruned = pruner.prune_inputs(dict(inputs))
    views = [rows * cols + 1 for split in IDEFICS3_SPLITS for rows, cols in split]  # tiles + the global view
    assert [record.num_tokens for record in pruned.images] == [count * TOKENS_PER_TILE for count in views]
    assert [record.batch_index for record in pruned.images] == [0, 1, 2, 2]
    # Every marker and text token is still there, in order; only image tokens went.
    for row in range(3):
        before = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        after = pruned.model_kwargs["input_ids"][row][pruned.model_kwargs["attention_mask"][row].bool()]
        assert torch.equal(before[before != IMAGE_TOKEN_ID], after[after != IMAGE_TOKEN_ID])
        assert int((after == IMAGE_TOKEN_ID).sum()) == 5 * len(IDEFICS3_SPLITS[row])


def test_idefics3_per_tile_budget_gives_each_sub_image_its_share():
    """``tile_budget="per_tile"`` (vLLM's rule): each sub-image and the global view keep a
    share of K in proportion to their tokens, so each run's length follows from the split."""
    model = tiny_model(IDEFICS3)
    inputs = IDEFICS3.make_inputs(model, 3, 0)  # row 2: an unsplit image, then a 2 x 2 split
    with flashvlm.prune(model, budget=12, tile_budget="per_tile") as pruner:
        pruned = pruner.prune_inputs(dict(inputs))
    split = pruned.images[-1]  # four sub-images and the global view, 80 tokens
    assert (split.num_tokens, split.num_kept) == (80, 12)
    assert [region.grid_shape for region in split.regions] == [(4, 4)] * 5
    per_view = torch.bincount(split.keep_indices // TOKENS_PER_TILE, minlength=5).tolist()
    assert per_view == [2, 2, 2, 2, 4]  # round(12 * 16 / 80) = 2 each, the global view the rest
    with pytest.raises(FlashVLMError, match="tile_budget must be one of 'per_image', 'per_tile'; got 'tiles'"):
        with flashvlm.prune(model, budget=12, tile_budget="tiles"):
            pass


@pytest.fixture(scope="module")
def idefics3_folder(tmp_path_factory):
    """The tiny Idefics3 saved as a Hugging Face folder with its processor."""
    folder = tmp_path_factory.mktemp("tiny-idefics3")
    tiny_model(IDEFICS3).save_pretrained(folder)
    tiny_idefics3_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "wide.png"
    generator = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (40, 70, 3), generator=generator, dtype=torch.uint8).numpy()).save(path)
    return path


def test_idefics3_folder_through_the_command_line(idefics3_folder, wide_image_file, capsys):
    from flashvlm.cli import main

    arguments = ["generate", "--model", str(idefics3_folder), "--image", str(wide_image_file)]
    code = main([*arguments, "--prompt", "what is the color ?", "--budget", "8", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("answer:")
    assert "kept 8 of 80 visual tokens" in out


def test_idefics3_question_tokens_are_the_users_words_amid_the_image_markers(idefics3_folder, wide_image_file, capsys):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from flashvlm.adapters.sequence import question_token_mask
    from flashvlm.cli import main

    processor = AutoProcessor.from_pretrained(idefics3_folder)
    model = AutoModelForImageTextToText.from_pretrained(idefics3_folder).eval()
    question = "what is the color of the circle ?"
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.open(wide_image_file)], text=[text], return_tensors="pt")
    mask = question_token_mask(processor.tokenizer, inputs["input_ids"], inputs["attention_mask"], [question])
    assert processor.tokenizer.decode(inputs["input_ids"][0][mask[0]]) == question
    with flashvlm.prune(model, 8, "flashvlm:question", tokenizer=processor) as pruner, torch.no_grad():
        model.generate(**inputs, question=[question], max_new_tokens=2, do_sample=False)
    assert pruner.last.images[0].num_kept == 8
    arguments = ["generate", "--model", str(idefics3_folder), "--image", str(wide_image_file), "--prompt", question]
    assert main([*arguments, "--method", "flashvlm:question", "--budget", "8", "--max-new-tokens", "2"]) == 0
    assert "kept 8 of 80 visual tokens" in capsys.readouterr().out
