"""InternVL, SmolVLM/Idefics3 and LLaVA-NeXT-Video on their tiny models: identity at full budget,
batching, half precision, saliency against the towers' own attention maps, and each family's
layout (tiles and sub-images sharing one budget, marker tokens kept, video budgets).

The method x family contract (exactly K per unit, prefill = text + K, every method runs or
says why not) runs these families in test_matrix.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import ADAPTER_TEST_FAMILIES, EVERY_CASE, tiny_model
from families.idefics3 import GLOBAL_IMAGE_ID, IDEFICS3_SPLITS, build_tiny_idefics3, tiny_idefics3_processor
from families.internvl import build_tiny_internvl, internvl_batch
from families.shared import IMAGE_TOKEN_ID, TOKENS_PER_TILE

import flashvlm
from flashvlm import FlashVLMError
from flashvlm.adapters import adapter_for

FAMILY_CASES = [case for case in EVERY_CASE if case.family not in ADAPTER_TEST_FAMILIES]
CASES = {case.name: case for case in FAMILY_CASES}
PARAMS = pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda case: case.name)


@PARAMS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_never_gives_nan(case, dtype):
    model = copy.deepcopy(tiny_model(case)).to(dtype)
    inputs = case.make_inputs(model, 2, 4)
    with flashvlm.prune(model, budget=6) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert all(record.num_kept == 6 for record in pruner.last.images)


def reference_attention(tower, pixel_values, layer: int, **tower_kwargs) -> torch.Tensor:
    """(P, H, S, S) post-softmax attention of one tower layer, from an eager copy's own maps."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(pixel_values, output_attentions=True, **tower_kwargs).attentions[layer]


@pytest.mark.parametrize("qk_norm", [False, True], ids=["internvit-300m", "internvit-6b-qk-norm"])
def test_internvl_saliency_is_the_cls_row_averaged_over_each_shuffle_group(qk_norm):
    model = build_tiny_internvl(use_qk_norm=qk_norm, norm_type="rms_norm" if qk_norm else "layer_norm")
    inputs = internvl_batch(model, 2, 0)
    adapter = adapter_for(model)
    stack = adapter.encode_tiles(inputs["pixel_values"], inputs, frozenset({"saliency"}))
    attention = reference_attention(model.model.vision_tower, inputs["pixel_values"], layer=-1)
    cls_row = attention[:, :, 0, 1:].mean(dim=1)  # (P, n)
    torch.testing.assert_close(stack.saliency, adapter.group_mean(cls_row[..., None]).squeeze(-1))
    assert stack.saliency.shape == (inputs["pixel_values"].shape[0], TOKENS_PER_TILE)


def test_internvl_tiles_share_the_image_budget_with_the_thumbnail():
    model = tiny_model(CASES["internvl"])
    inputs = internvl_batch(model, 1, 0)  # one image: 2 tiles + thumbnail, 48 tokens
    with flashvlm.prune(model, budget=12) as pruner:
        (record,) = pruner.prune_inputs(dict(inputs)).images
    assert (record.num_tokens, record.num_kept, record.grid_shape) == (48, 12, None)
    # The thumbnail (last 16 tokens) keeps round(12 * 16 / 48) = 4; the tiles keep 8 between them.
    assert int((record.keep_indices >= 32).sum()) == 4
    tiles, thumbnail = record.regions
    assert (tiles.positions.numel(), tiles.grid_shape, thumbnail.grid_shape) == (32, None, (4, 4))


def test_internvl_image_processor_puts_the_thumbnail_after_the_tiles():
    """The layout the adapter assumes: an image's tiles in order, then its thumbnail."""
    from PIL import Image
    from transformers import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=2)
    wide = Image.fromarray(torch.randint(0, 256, (32, 64, 3), dtype=torch.uint8).numpy())
    tiled = processor(images=[wide], return_tensors="pt")
    whole = processor(images=[wide], crop_to_patches=False, return_tensors="pt")
    assert tiled["num_patches"].tolist() == [3]
    torch.testing.assert_close(tiled["pixel_values"][-1], whole["pixel_values"][0])


def test_internvl_placeholders_that_make_no_whole_tiles_are_a_clear_error():
    model = tiny_model(CASES["internvl"])
    inputs = internvl_batch(model, 1, 0)
    inputs["pixel_values"] = inputs["pixel_values"][:2]
    with flashvlm.prune(model, budget=4), pytest.raises(FlashVLMError, match="whole tiles of 16 tokens"):
        model(**inputs)


def test_idefics3_prompts_that_do_not_match_the_sub_images_are_a_clear_error():
    model = tiny_model(CASES["idefics3"])
    inputs = CASES["idefics3"].make_inputs(model, 1, 0)  # one image split 1 x 2: three sub-images
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
    inputs = CASES["idefics3"].make_inputs(model, 1, 0)
    adapter = adapter_for(model)
    stack = adapter.encode_sub_images(inputs, frozenset({"saliency"}))
    pixel_values = inputs["pixel_values"][0]  # one row, every sub-image real
    attention = reference_attention(model.model.vision_model, pixel_values, layer=-1)
    received = attention.sum(dim=2).mean(dim=1)  # (R, n)
    torch.testing.assert_close(stack.saliency, adapter.group_mean(received[..., None]).squeeze(-1))
    # One score per language-model token: the 8 x 8 patch raster shuffled by the scale factor.
    assert stack.saliency.shape == (received.shape[0], 64 // scale_factor**2)


def test_idefics3_sub_images_form_images_and_markers_stay():
    model = tiny_model(CASES["idefics3"])
    inputs = CASES["idefics3"].make_inputs(model, 3, 0)
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


@pytest.fixture(scope="module")
def idefics3_folder(tmp_path_factory):
    """The tiny Idefics3 saved as a Hugging Face folder with its processor."""
    folder = tmp_path_factory.mktemp("tiny-idefics3")
    tiny_model(CASES["idefics3"]).save_pretrained(folder)
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


def test_llava_next_video_budget_per_frame_or_per_video():
    case = CASES["llava_next_video"]
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    with flashvlm.prune(model, budget=5, video_budget="per_frame") as pruner:
        per_frame = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "frame"]
    with flashvlm.prune(model, budget=0.5, video_budget="per_video") as pruner:
        per_video = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "video"]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [record.num_kept for record in per_frame] == [5] * 6 and {r.grid_shape for r in per_frame} == {(3, 3)}
    assert [(record.num_tokens, record.num_kept, record.grid_shape) for record in per_video] == [(27, 14, None)] * 2
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


def test_llava_next_video_frame_saliency_is_the_cls_row_averaged_over_the_pooling_windows():
    case = CASES["llava_next_video"]
    model = tiny_model(case)
    inputs = case.make_inputs(model, 1, 0)
    (video,) = adapter_for(model).video_items(inputs, frozenset({"saliency"}))
    frames = inputs["pixel_values_videos"][0]  # (F, 3, H, W)
    attention = reference_attention(model.model.vision_tower, frames, layer=-2)  # the feature layer
    cls_row = attention[:, :, 0, 1:].mean(dim=1).view(-1, 1, 6, 6)  # (F, 1, 6, 6) patch raster
    pooled = torch.nn.functional.avg_pool2d(cls_row, kernel_size=2).flatten(1)  # (F, 9)
    torch.testing.assert_close(video.saliency, pooled.flatten())


@pytest.mark.parametrize("name", ["internvl", "smolvlm"])
def test_families_that_send_frames_as_images_refuse_a_per_video_budget(name):
    model = tiny_model(CASES[name])
    with pytest.raises(
        FlashVLMError, match="video_budget='per_video' is not available for .*use video_budget='per_frame'"
    ):
        flashvlm.apply(model, budget=4, video_budget="per_video")
    assert not hasattr(model, "_flashvlm_pruner")


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
