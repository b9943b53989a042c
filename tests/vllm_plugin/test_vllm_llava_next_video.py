"""The plug-in on a tiny random LLaVA-NeXT-Video against Hugging Face + flashvlm.

vLLM's class takes videos only. The video: four 24 x 24 frames, each one tower tile of 6 x 6
CLIP patches, pooled 2 x 2 by the model's resampler to 3 x 3 tokens; no newline. Each
selection must agree with ``flashvlm.prune`` on the transformers model as tests/agreement.py
defines it; then the kept indices, greedy tokens, log-probabilities and prompt length must
equal transformers run on the tokens vLLM kept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anyres_checks import check_video_equals_transformers
from families.shared import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    LLAVA_CHAT_TEMPLATE,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    served_text_config,
    tiny_clip_config,
    tiny_tokenizer,
)
from test_vllm_llava import (
    EOS_ID,
    MAX_TOKENS,
    assert_same_answer,
    only_output,
    recorded_rows,
    transformers_on_vllm_choice,
)
from transformers import AutoProcessor, LlamaConfig, LlavaNextVideoForConditionalGeneration
from vllm_harness import run_stock_and_plugin

from flashvlm.integrations.vllm.export import export_for_vllm
from flashvlm.loading import chat_prompt

QUESTIONS = ["what is the color of the shape ?", "how many red circle ?"]
VIDEO_FRAMES, FRAME_TOKENS = 4, 9
#: Per frame (the default), then for the whole video; each once on an engine of its own
#: settings, the video budget also as a request's own on the per-frame engine.
PER_FRAME = {"budget": 4}
PER_VIDEO = {"budget": 12, "video_budget": "per_video"}
#: Methods with other paths, at 4 per frame: VisionZip merges tokens and reads the CLS row
#: and keys (both pooled over the resampler's windows); pool reads each frame's raster.
OTHER_METHODS = ("visionzip", "pool")


def build_llava_next_video() -> LlavaNextVideoForConditionalGeneration:
    from transformers import LlavaNextVideoConfig

    tokenizer = tiny_tokenizer(video_tokens=True)
    text = served_text_config(LlamaConfig, vocab_size=len(tokenizer))
    config = LlavaNextVideoConfig(
        vision_config=tiny_clip_config(ANYRES_TILE),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return LlavaNextVideoForConditionalGeneration(config).eval()


def save_processor(folder) -> None:
    """LlavaNextVideoProcessor as the real checkpoints' (PIL image processor, LLaVA-1.5's chat
    format), its video processor making one-tile frames (the vLLM environment has torchvision's
    Python parts)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=ANYRES_PINPOINTS, size={"shortest_edge": ANYRES_TILE}, crop_size=tile
    )
    LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": ANYRES_TILE}, crop_size=tile),
        image_processor=image_processor,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        tokenizer=tiny_tokenizer(video_tokens=True),
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-llava-next-video")
    hf_folder = root / "next-video-hf"
    build_llava_next_video().save_pretrained(hf_folder)
    save_processor(hf_folder)
    # transformers 5 names the tower's weights as vLLM 0.32 does not (see docs/vllm.md).
    vllm_folder = export_for_vllm(hf_folder, root / "next-video")
    generator = torch.Generator().manual_seed(0)
    video = root / "video.npy"
    frames = torch.randint(0, 256, (VIDEO_FRAMES, ANYRES_TILE, ANYRES_TILE, 3), generator=generator, dtype=torch.uint8)
    np.save(video, frames.numpy())
    return {"hf": hf_folder, "vllm": vllm_folder, "video": str(video), "root": root}


@pytest.fixture(scope="module")
def hf_model(folders):
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(folders["hf"]).eval()
    return model, AutoProcessor.from_pretrained(folders["hf"])


@pytest.fixture(scope="module")
def runs(folders, hf_model):
    _, processor = hf_model
    requests = [
        {"prompt": chat_prompt(processor, question).replace("<image>", "<video>"), "videos": [folders["video"]]}
        for question in QUESTIONS
    ]
    one_by_one = [[request] for request in requests]
    # The first question again on the per-frame engine, with a video budget of its own.
    own = {**requests[0], "mm_processor_kwargs": {"flashvlm": PER_VIDEO}}
    plugin_engines = [
        {"name": "off", "calls": one_by_one},
        {"name": "per_frame", "hf_overrides": {"flashvlm": PER_FRAME}, "calls": [*one_by_one, [own]]},
        {"name": "per_video", "hf_overrides": {"flashvlm": PER_VIDEO}, "calls": one_by_one},
        # Both questions in one batch, on an engine of its own (the others' encoder caches hold them).
        {"name": "batch", "hf_overrides": {"flashvlm": PER_FRAME}, "calls": [requests]},
    ]
    for method in OTHER_METHODS:
        overrides = {"flashvlm": {**PER_FRAME, "method": method}}
        plugin_engines.append({"name": method, "hf_overrides": overrides, "calls": one_by_one[:1]})
    job = {
        "model": str(folders["vllm"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "engine_args": {"limit_mm_per_prompt": {"video": 1}},
    }
    stock_engines = [{"name": "stock", "calls": one_by_one}]
    stock, plugin = run_stock_and_plugin(job, stock_engines, plugin_engines, folders["root"] / "jobs")
    return {"stock": stock["stock"], "plugin": plugin, "requests": requests}


def check_video(runs, hf_model, engine: str, index: int, request: dict, settings: dict, method="flashvlm"):
    """vLLM's call ``index`` on ``engine`` against transformers with ``settings`` (anyres_checks)."""
    call, vllm_rows = runs["plugin"][engine][index], recorded_rows(runs["plugin"]["selections"], engine, index)
    stock_call = runs["stock"][runs["requests"].index(request)]
    frames = (VIDEO_FRAMES, FRAME_TOKENS)
    check_video_equals_transformers(hf_model, call, vllm_rows, request, stock_call, settings, frames, method)


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    from transformers_reference import transformers_reference

    model, processor = hf_model
    off = [only_output(call) for call in runs["plugin"]["off"]]
    assert off == [only_output(call) for call in runs["stock"]]
    for request, result in zip(runs["requests"], off):
        reference = transformers_reference(model, processor, request, None, max_tokens=MAX_TOKENS, eos_id=EOS_ID)
        assert result["output_ids"] == reference["output_ids"]


@pytest.mark.parametrize("engine, settings", [("per_frame", PER_FRAME), ("per_video", PER_VIDEO)])
def test_each_video_keeps_what_transformers_keeps(runs, hf_model, engine, settings):
    for index, request in enumerate(runs["requests"]):
        check_video(runs, hf_model, engine, index, request, settings)


def test_a_request_with_a_video_budget_of_its_own_keeps_what_transformers_keeps(runs, hf_model):
    check_video(runs, hf_model, "per_frame", len(runs["requests"]), runs["requests"][0], PER_VIDEO)


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_keep_what_they_keep_in_transformers(runs, hf_model, method):
    check_video(runs, hf_model, method, 0, runs["requests"][0], PER_FRAME, method)


def test_a_batch_equals_the_requests_one_by_one(runs, hf_model):
    # Each request of the batch against transformers, as the single requests are (the batch's
    # frames reach the tower together: its features differ from theirs in the last bits).
    (batch,) = runs["plugin"]["batch"]
    singles = runs["plugin"]["per_frame"][: len(runs["requests"])]
    batch_rows = recorded_rows(runs["plugin"]["selections"], "batch", 0)
    batch_kept = [record[2] for record in batch["kept"]]
    for request, output, single in zip(runs["requests"], batch["outputs"], singles):
        reference = transformers_on_vllm_choice(hf_model, batch_rows, request, PER_FRAME["budget"], every=False)
        assert_same_answer({"outputs": [output]}, reference)
        assert len(output["prompt_ids"]) == reference["prompt_length"] == only_output(single)["prompt_length"]
        frames = reference["kept"]  # one per frame, indices within it
        assert [index + frame * FRAME_TOKENS for frame, indices in enumerate(frames) for index in indices] in batch_kept


def test_a_second_question_reuses_the_videos_tower_outputs(runs):
    calls = runs["plugin"]["per_frame"]
    assert calls[0]["tower"] != [] and calls[1]["tower"] == []  # the same video, another question
    assert calls[0]["kept"][0][0] != calls[1]["kept"][0][0]  # guided by the other question
