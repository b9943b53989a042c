"""The plug-in on a tiny random InternVL (HF format) against Hugging Face + flashvlm.

vLLM serves it with its InternS1 class. The images: a 64 x 32 one (two 32 px tiles plus the
thumbnail, 48 tokens after the 2 x 2 pixel shuffle, one run between ``<img>`` and ``</img>``)
and a 32 x 32 one (one tile, 16 tokens); the video: four 32 x 32 frames, each a one-tile run
of its own. Each selection must agree with ``flashvlm.prune`` on the transformers model as
tests/agreement.py defines it; then the kept indices, greedy tokens, log-probabilities and
prompt length must equal transformers run on the tokens vLLM kept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anyres_checks import check_video_equals_transformers
from families.shared import (
    CHATML_TEMPLATE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TILE_SIZE,
    TILED_VOCAB_SIZE,
    TOKENS_PER_TILE,
    fixed_id_tokenizer,
    served_text_config,
    tiny_vision_config,
)
from test_vllm_llava import (
    MAX_TOKENS,
    only_output,
    recorded_rows,
    with_settings,
)
from tiled_checks import check_batch, check_image, check_plugin_off, check_second_question
from transformers import AutoProcessor, InternVLForConditionalGeneration, Qwen2Config
from vllm_harness import run_stock_and_plugin

from flashvlm.loading import chat_prompt

QUESTIONS = ["what is the color of the shape ?", "how many red circle ?"]
#: (width, height) of each image, and its tokens: two tiles and the thumbnail; one tile.
IMAGE_SIZES = [(64, 32), (32, 32)]
IMAGE_TOKENS = [3 * TOKENS_PER_TILE, TOKENS_PER_TILE]
VIDEO_FRAMES = 4
#: Two budgets: the engine's, and a request's own; the video at the first, per frame.
BUDGETS = (8, 3)
#: Methods with other paths, as requests' own, at the first budget on the tiled image:
#: VisionZip merges tokens and reads the CLS row and keys; pool reads each tile as its own raster.
OTHER_METHODS = ("visionzip", "pool")
PER_VIDEO = {"budget": 8, "video_budget": "per_video"}


def build_internvl() -> InternVLForConditionalGeneration:
    from transformers import InternVLConfig, InternVLVisionConfig

    config = InternVLConfig(
        vision_config=tiny_vision_config(InternVLVisionConfig, TILE_SIZE),
        text_config=served_text_config(Qwen2Config, vocab_size=TILED_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_TILE,
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval()


def save_processor(folder) -> None:
    """InternVLProcessor as the real checkpoints' (32 px tiles, up to 4 and the thumbnail, the
    ChatML format), with its video processor (the vLLM environment has torchvision's Python parts)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, InternVLVideoProcessor

    tokenizer = fixed_id_tokenizer(
        start_image_token="<img>", end_image_token="</img>", context_image_token="<image>", video_token="<video>"
    )
    tile = {"height": TILE_SIZE, "width": TILE_SIZE}
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size=tile, crop_to_patches=True, max_patches=4),
        video_processor=InternVLVideoProcessor(size=tile),
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"),
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vllm-internvl")
    folder = root / "internvl"
    build_internvl().save_pretrained(folder)
    save_processor(folder)
    generator = torch.Generator().manual_seed(0)
    images = []
    for index, (width, height) in enumerate(IMAGE_SIZES):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(root / f"image{index}.png")
        Image.fromarray(pixels.numpy()).save(images[-1])
    frames = torch.randint(0, 256, (VIDEO_FRAMES, TILE_SIZE, TILE_SIZE, 3), generator=generator, dtype=torch.uint8)
    np.save(root / "video.npy", frames.numpy())
    return {"model": folder, "images": [str(image) for image in images], "video": str(root / "video.npy"), "root": root}


@pytest.fixture(scope="module")
def hf_model(folders):
    model = InternVLForConditionalGeneration.from_pretrained(folders["model"]).eval()
    return model, AutoProcessor.from_pretrained(folders["model"])


@pytest.fixture(scope="module")
def runs(folders, hf_model):
    _, processor = hf_model
    images = [
        {"prompt": chat_prompt(processor, question), "images": [image]}
        for question, image in zip(QUESTIONS, folders["images"])
    ]
    video = {"prompt": chat_prompt(processor, QUESTIONS[0]).replace("<image>", "<video>"), "videos": [folders["video"]]}
    first, second = BUDGETS
    # One pruned engine at the first budget; the second budget and the other methods come as
    # requests' own settings (each its own selection: the settings are in the cache key).
    calls = {
        **{f"image{index}": request for index, request in enumerate(images)},
        "video": video,
        # The tiled image again, asked the other question: its tower output is reused.
        "again": {**images[0], "prompt": chat_prompt(processor, QUESTIONS[1])},
        "per_video": {**video, "mm_processor_kwargs": {"flashvlm": PER_VIDEO}, "expect_error": True},
        **{
            f"image{index}@{second}": with_settings(request, {"budget": second}) for index, request in enumerate(images)
        },
        **{method: with_settings(images[0], {"budget": first, "method": method}) for method in OTHER_METHODS},
    }
    one_by_one = [[request] for request in [*images, video]]
    plugin_engines = [
        {"name": "off", "calls": one_by_one},
        {"name": "pruned", "hf_overrides": {"flashvlm": {"budget": first}}, "calls": [[c] for c in calls.values()]},
        # Both images in one batch, on an engine of its own (the other's encoder cache holds them).
        {"name": "batch", "hf_overrides": {"flashvlm": {"budget": first}}, "calls": [images]},
    ]
    job = {
        "model": str(folders["model"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "engine_args": {"limit_mm_per_prompt": {"image": 1, "video": 1}},
    }
    stock_engines = [{"name": "stock", "calls": one_by_one}]
    stock, plugin = run_stock_and_plugin(job, stock_engines, plugin_engines, folders["root"] / "jobs")
    at = {name: place for place, name in enumerate(calls)}
    return {"stock": stock["stock"], "plugin": plugin, "images": images, "video": video, "calls": calls, "at": at}


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    check_plugin_off(runs, hf_model, [*runs["images"], runs["video"]])


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_image_keeps_what_transformers_keeps(runs, hf_model, budget):
    for index, tokens in enumerate(IMAGE_TOKENS):
        name = f"image{index}" if budget == BUDGETS[0] else f"image{index}@{budget}"
        call = check_image(runs, hf_model, name, budget)
        ((_, num_tokens, kept),) = call["kept"]
        assert num_tokens == tokens and len(kept) == budget
        stock = only_output(runs["stock"][index])
        assert only_output(call)["prompt_length"] == stock["prompt_length"] - tokens + budget  # <img>, </img> stay


def test_each_video_frame_keeps_what_transformers_keeps(runs, hf_model):
    index = runs["at"]["video"]
    call, vllm_rows = runs["plugin"]["pruned"][index], recorded_rows(runs["plugin"]["selections"], "pruned", index)
    frames = (VIDEO_FRAMES, TOKENS_PER_TILE)
    stock = runs["stock"][len(runs["images"])]
    check_video_equals_transformers(hf_model, call, vllm_rows, runs["video"], stock, {"budget": BUDGETS[0]}, frames)


def test_a_video_budget_per_video_is_refused_in_one_line(runs):
    error = runs["plugin"]["pruned"][runs["at"]["per_video"]]["error"]
    assert error is not None and "video_budget='per_video' is not served for this model" in error, error
    assert "\n" not in error


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_keep_what_they_keep_in_transformers(runs, hf_model, method):
    check_image(runs, hf_model, method, BUDGETS[0], method)


def test_a_batch_equals_the_requests_one_by_one(runs, hf_model):
    check_batch(runs, hf_model, BUDGETS[0])


def test_a_second_question_reuses_the_images_tower_output(runs, hf_model):
    check_second_question(runs, hf_model, BUDGETS[0])
