"""The plug-in on a tiny random LLaVA-OneVision (AnyRes, SigLIP) against Hugging Face + flashvlm
with ``newlines="every_row"``.

Two images: one whose crop raster vLLM and transformers keep as it is (30 x 45: 2 x 2 crops,
unpadded), one whose raster both shrink by bilinear interpolation (90 x 100: 4 x 4 crops, 22 x
24 after unpadding, 17 x 18 after "anyres_max_9"), so the selection runs among tokens that no
tower output equals. vLLM's OneVision hard-codes anyres_max_9, which the tiny config uses too.
And a video of four frames, each 3 x 3 tokens after the model's 2 x 2 pooling, then one newline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from anyres_checks import (
    check_batch_equals_the_requests_one_by_one,
    check_each_request_equals_transformers,
    check_plugin_off_is_stock_vllm_and_equals_transformers,
    check_video_equals_transformers,
)
from families.llava_onevision import tiny_llava_onevision_processor
from families.shared import (
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    served_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)
from test_vllm_llava import (
    MAX_TOKENS,
    assert_same_selection_and_answer,
    recorded_rows,
    transformers_on_vllm_choice,
)
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
from vllm_harness import run_stock_and_plugin

from flashvlm.integrations.vllm.export import export_for_vllm
from flashvlm.loading import chat_prompt

#: (height, width): a raster kept as it is, and one interpolated down (see the module's text).
IMAGE_SIZES = [(30, 45), (90, 100)]
PINPOINTS = [[24, 48], [48, 24], [48, 48], [96, 96]]
QUESTIONS = ["what is the color of the shape ?", "how many red circle ?"]
#: 1.0: every token; 24 patch tokens; a ratio, so the base/crop split differs per image.
BUDGETS = (1.0, 24, 0.3)
FULL, SMALL = BUDGETS[0], BUDGETS[1]
#: Methods with other paths, on the interpolated image at 24: divprune reads the projected
#: tokens, pool each view's raster grid (the interpolated one for the crops).
OTHER_METHODS = ("divprune", "pool")
#: The video's frames (24 x 24, one tower tile each: 6 x 6 patches, pooled to 3 x 3 tokens).
VIDEO_FRAMES, FRAME_TOKENS = 4, 9
#: A video's own settings, on the engine at SMALL (which would keep every frame token): 4 per
#: frame, then 12 for the whole video, its frames selected jointly.
PER_FRAME = {"budget": 4}
PER_VIDEO = {"budget": 12, "video_budget": "per_video"}


def build_llava_onevision() -> LlavaOnevisionForConditionalGeneration:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tokenizer = tiny_tokenizer(video_tokens=True)
    # The video token is the tokenizer's "<video>", above the words (the shared VIDEO_TOKEN_ID is its "<unk>").
    text = served_text_config(Qwen2Config, vocab_size=len(tokenizer))
    config = LlavaOnevisionConfig(
        vision_config=tiny_vision_config(SiglipVisionConfig, ANYRES_TILE),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def save_processor(folder) -> None:
    tiny_llava_onevision_processor(PINPOINTS, "anyres_max_9").save_pretrained(folder)
    # As a folder saved where torchvision is installed: vLLM's processor loads a video processor too.
    config_file = folder / "processor_config.json"
    processor_config = json.loads(config_file.read_text())
    # Frames of one tower tile, as the images' views.
    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    processor_config["video_processor"] = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": tile}
    config_file.write_text(json.dumps(processor_config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vllm-llava-onevision")
    hf_folder = root / "onevision-hf"
    build_llava_onevision().save_pretrained(hf_folder)
    save_processor(hf_folder)
    vllm_folder = export_for_vllm(hf_folder, root / "onevision")
    generator = torch.Generator().manual_seed(0)
    images = []
    for height, width in IMAGE_SIZES:
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        path = root / f"image-{height}x{width}.png"
        Image.fromarray(pixels).save(path)
        images.append(str(path))
    video = root / "video.npy"
    np.save(video, torch.randint(0, 256, (VIDEO_FRAMES, 24, 24, 3), generator=generator, dtype=torch.uint8).numpy())
    return {"hf": hf_folder, "vllm": vllm_folder, "images": images, "video": str(video), "root": root}


@pytest.fixture(scope="module")
def hf_model(folders):
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folders["hf"]).eval()
    return model, AutoProcessor.from_pretrained(folders["hf"])


@pytest.fixture(scope="module")
def runs(folders, hf_model):
    _, processor = hf_model
    requests = [
        {"prompt": chat_prompt(processor, question), "images": [image]}
        for question, image in zip(QUESTIONS, folders["images"])
    ]
    one_by_one = [[request] for request in requests]
    video = {"prompt": chat_prompt(processor, QUESTIONS[0]).replace("<image>", "<video>"), "videos": [folders["video"]]}
    videos = [[{**video, "mm_processor_kwargs": {"flashvlm": own}}] for own in (PER_FRAME, PER_VIDEO)]
    with_video = {"limit_mm_per_prompt": {"image": 1, "video": 1}}
    stock_engines = [{"name": "stock", "engine_args": with_video, "calls": [*one_by_one, [video]]}]
    plugin_engines = [{"name": "off", "calls": one_by_one}]
    # At SMALL, the interpolated image is then asked the first question: its views' tower outputs are reused.
    again = {"prompt": chat_prompt(processor, QUESTIONS[0]), "images": [folders["images"][1]]}
    # At FULL, the interpolated image then comes with settings of its own: its K + rows placeholders follow them.
    own = {**requests[1], "mm_processor_kwargs": {"flashvlm": {"budget": BUDGETS[-1]}}}
    for budget in BUDGETS:
        calls = {SMALL: [*one_by_one, [again], *videos], FULL: [*one_by_one, [own]]}.get(budget, one_by_one)
        engine = {"name": f"b{budget}", "hf_overrides": {"flashvlm": {"budget": budget}}, "calls": calls}
        plugin_engines.append({**engine, "engine_args": with_video} if budget == SMALL else engine)
    # Both sizes in one batch, on an engine of its own (the others' encoder caches hold them).
    overrides = {"flashvlm": {"budget": SMALL}}
    plugin_engines.append({"name": "batch", "hf_overrides": overrides, "calls": [requests]})
    for method in OTHER_METHODS:
        overrides = {"flashvlm": {"method": method, "budget": SMALL}}
        plugin_engines.append({"name": method, "hf_overrides": overrides, "calls": one_by_one[1:]})
    # SigLIP has no CLS row: a method that reads one is refused when the engine starts.
    refused = {"flashvlm": {"method": "visionzip", "budget": SMALL}}
    plugin_engines.append({"name": "visionzip", "hf_overrides": refused, "expect_error": True, "calls": []})
    job = {
        "model": str(folders["vllm"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        # Images only: no dummy videos while vLLM profiles (the tiny folder has no real video processor use).
        "engine_args": {"limit_mm_per_prompt": {"image": 1, "video": 0}},
    }
    stock, plugin = run_stock_and_plugin(job, stock_engines, plugin_engines, folders["root"] / "jobs")
    video_calls = {"stock": stock["stock"].pop(), "request": video}
    for name, index in (("per_video", -1), ("per_frame", -2)):
        video_calls[name] = (plugin[f"b{SMALL}"][index], recorded_rows(plugin["selections"], f"b{SMALL}", index))
    return {"stock": stock, "plugin": plugin, "requests": requests, "videos": video_calls}


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    check_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model)


@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_tokens_and_kept_indices_equal_transformers_with_every_rows_newline(runs, hf_model, budget):
    check_each_request_equals_transformers(runs, hf_model, budget, FULL)


def test_a_request_with_settings_of_its_own_keeps_what_transformers_keeps(runs, hf_model):
    engine = f"b{FULL}"
    index = len(runs["requests"])
    call = runs["plugin"][engine][index]
    vllm_rows = recorded_rows(runs["plugin"]["selections"], engine, index)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, runs["requests"][1], BUDGETS[-1], newlines="every_row")
    assert_same_selection_and_answer(call, reference)
    ((_, num_tokens, kept),) = call["kept"]
    assert len(kept) < num_tokens  # the request's 0.3, not the engine's 1.0


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_keep_what_they_keep_in_transformers(runs, hf_model, method):
    (call,) = runs["plugin"][method]
    vllm_rows = recorded_rows(runs["plugin"]["selections"], method, 0)
    request = runs["requests"][1]
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, SMALL, method, newlines="every_row")
    assert_same_selection_and_answer(call, reference)


def test_two_image_sizes_in_one_batch_equal_the_requests_one_by_one(runs, hf_model):
    check_batch_equals_the_requests_one_by_one(runs, hf_model, SMALL)


def test_a_second_question_reuses_the_views_tower_outputs(runs):
    calls = runs["plugin"][f"b{SMALL}"]
    assert calls[2]["tower"] == [] and calls[1]["tower"] != []
    assert calls[2]["kept"][0][0] != calls[1]["kept"][0][0]  # guided by the other question


@pytest.mark.parametrize("which, own", [("per_frame", PER_FRAME), ("per_video", PER_VIDEO)])
def test_a_video_keeps_what_transformers_keeps_per_frame_or_per_video(runs, hf_model, which, own):
    # Each frame's pooled tokens (or the whole video's), then the video's newline, always kept.
    call, vllm_rows = runs["videos"][which]
    request, stock_call = runs["videos"]["request"], runs["videos"]["stock"]
    frames = (VIDEO_FRAMES, FRAME_TOKENS)
    check_video_equals_transformers(hf_model, call, vllm_rows, request, stock_call, own, frames, newlines="every_row")


def test_a_method_that_reads_a_cls_row_is_refused_at_start_up(runs):
    error = runs["plugin"]["visionzip"]["error"]
    assert error is not None and "visionzip" in error, error
