"""The plug-in on a tiny random LLaVA-NeXT (AnyRes) against Hugging Face + flashvlm with
``newlines="every_row"``, and the switch refused on an architecture the plug-in does not serve.

vLLM fixes each image's placeholder count from its size, so the plug-in keeps every crop
row's newline; transformers does the same with ``newlines="every_row"``. One job builds every
engine with plug-ins on, another stock vLLM (plug-ins disabled); each also runs a tiny
text-only Llama, which must stay stock with plug-ins on, and refuse the switch.
"""

from __future__ import annotations

import pytest
import torch
from anyres_checks import (
    check_batch_equals_the_requests_one_by_one,
    check_each_request_equals_transformers,
    check_plugin_off_is_stock_vllm_and_equals_transformers,
)
from families.llava_next import tiny_llava_next_processor
from families.shared import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    served_text_config,
    tiny_clip_config,
    tiny_tokenizer,
)
from test_vllm_llava import (
    MAX_TOKENS,
    assert_same_answer,
    assert_same_selection_and_answer,
    only_output,
    recorded_rows,
    transformers_on_vllm_choice,
)
from transformers import (
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from vllm_harness import run_stock_and_plugin

from flashvlm.integrations.vllm import ARCHITECTURES
from flashvlm.integrations.vllm.export import export_for_vllm
from flashvlm.loading import chat_prompt

#: (height, width): two AnyRes layouts (2 x 1 and 1 x 2 crops, unpadded differently).
IMAGE_SIZES = [(30, 45), (45, 24)]
QUESTIONS = ["what is the color of the shape ?", "how many red circle ?"]
#: 1.0: every token; 24 of 108-120 tokens; a ratio, so the base/crop split differs per image.
BUDGETS = (1.0, 24, 0.3)
FULL, SMALL = BUDGETS[0], BUDGETS[1]
#: Methods with other paths, on the first image at 24: VisionZip merges tokens (its merged
#: features are projected in place) and reads keys; pool reads each view's raster grid.
OTHER_METHODS = ("visionzip", "pool")


def text_config():
    return served_text_config(LlamaConfig)


def build_llava_next() -> LlavaNextForConditionalGeneration:
    config = LlavaNextConfig(
        vision_config=tiny_clip_config(ANYRES_TILE),
        text_config=text_config(),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny LLaVA-NeXT and a tiny text-only Llama saved as folders, and two image files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vllm-llava-next")
    hf_folder, llama_folder = root / "llava-next-hf", root / "llama"
    build_llava_next().save_pretrained(hf_folder)
    tiny_llava_next_processor().save_pretrained(hf_folder)
    # transformers 5 names the tower's weights as vLLM 0.32 does not (see docs/vllm.md).
    next_folder = export_for_vllm(hf_folder, root / "llava-next")
    torch.manual_seed(0)
    LlamaForCausalLM(text_config()).eval().save_pretrained(llama_folder)
    tiny_tokenizer().save_pretrained(llama_folder)
    generator = torch.Generator().manual_seed(0)
    images = []
    for height, width in IMAGE_SIZES:
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        path = root / f"image-{height}x{width}.png"
        Image.fromarray(pixels).save(path)
        images.append(str(path))
    return {"hf": hf_folder, "llava_next": next_folder, "llama": llama_folder, "images": images, "root": root}


@pytest.fixture(scope="module")
def hf_model(folders):
    model = LlavaNextForConditionalGeneration.from_pretrained(folders["hf"]).eval()
    return model, AutoProcessor.from_pretrained(folders["hf"])


@pytest.fixture(scope="module")
def runs(folders, hf_model):
    _, processor = hf_model
    requests = [
        {"prompt": chat_prompt(processor, question), "images": [image]}
        for question, image in zip(QUESTIONS, folders["images"])
    ]
    one_by_one = [[request] for request in requests]
    llama_calls = [[{"prompt": "what is the color of the shape ?"}]]
    llama = {"model": str(folders["llama"])}
    next_engine = {"engine_args": {"model": str(folders["llava_next"])}}
    stock_engines = [
        {"name": "stock", **next_engine, "calls": one_by_one},
        {"name": "llama", "engine_args": llama, "calls": llama_calls},
    ]
    plugin_engines = [{"name": "off", **next_engine, "calls": one_by_one}]
    # At SMALL, the first image is then asked the second question: its views' tower outputs are reused.
    again = {"prompt": chat_prompt(processor, QUESTIONS[1]), "images": [folders["images"][0]]}
    calls_at_small = [*one_by_one, [again]]
    for budget in BUDGETS:
        overrides = {"flashvlm": {"budget": budget}}
        calls = calls_at_small if budget == SMALL else one_by_one
        plugin_engines.append({"name": f"b{budget}", **next_engine, "hf_overrides": overrides, "calls": calls})
    plugin_engines[-1]["apply"] = "llava_next_layout:layout_matches_vllm_merge"
    no_reuse = {"flashvlm": {"budget": SMALL, "vision_cache_mb": 0}}
    plugin_engines.append({"name": "no reuse", **next_engine, "hf_overrides": no_reuse, "calls": calls_at_small})
    # Both sizes in one batch, on an engine of its own (the others' encoder caches hold them).
    overrides = {"flashvlm": {"budget": SMALL}}
    plugin_engines.append({"name": "batch", **next_engine, "hf_overrides": overrides, "calls": [requests]})
    for method in OTHER_METHODS:
        overrides = {"flashvlm": {"method": method, "budget": SMALL}}
        plugin_engines.append({"name": method, **next_engine, "hf_overrides": overrides, "calls": one_by_one[:1]})
    # A budget of 1 split over the views rounds the base view's share to 0: `none` must still send every view.
    keep_all = {"flashvlm": {"method": "none", "budget": 1}}
    # Then the other image with settings of its own: its K + rows placeholders follow the request's.
    own = {**requests[1], "mm_processor_kwargs": {"flashvlm": {"method": "flashvlm", "budget": BUDGETS[-1]}}}
    calls = [*one_by_one[:1], [own]]
    plugin_engines.append({"name": "none", **next_engine, "hf_overrides": keep_all, "calls": calls})
    plugin_engines.append({"name": "llama", "engine_args": llama, "calls": llama_calls})
    refused = {"name": "llama refused", "engine_args": llama, "hf_overrides": overrides, "expect_error": True}
    plugin_engines.append({**refused, "calls": []})
    job = {"model": str(folders["llava_next"]), "max_tokens": MAX_TOKENS, "logprobs": True}
    workdir = folders["root"] / "jobs"
    stock, plugin = run_stock_and_plugin(job, stock_engines, plugin_engines, workdir)
    return {"stock": stock, "plugin": plugin, "requests": requests}


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    check_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model)


@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_tokens_and_kept_indices_equal_transformers_with_every_rows_newline(runs, hf_model, budget):
    check_each_request_equals_transformers(runs, hf_model, budget, FULL)


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_keep_what_they_keep_in_transformers(runs, hf_model, method):
    (call,) = runs["plugin"][method]
    vllm_rows = recorded_rows(runs["plugin"]["selections"], method, 0)
    request = runs["requests"][0]
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, SMALL, method, newlines="every_row")
    if reference is None:  # VisionZip's merged tokens on a near-tie: the selection checks above hold
        return
    assert_same_selection_and_answer(call, reference)


def test_none_at_budget_one_sends_every_view_as_stock_vllm(runs):
    call = runs["plugin"]["none"][0]
    ((_, num_tokens, kept),) = call["kept"]
    assert kept == list(range(num_tokens))
    assert only_output(call) == only_output(runs["stock"]["stock"][0])


def test_a_request_with_settings_of_its_own_keeps_what_transformers_keeps(runs, hf_model):
    # On the engine that keeps every token (method none): the request's method at its budget.
    call = runs["plugin"]["none"][1]
    vllm_rows = recorded_rows(runs["plugin"]["selections"], "none", 1)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, runs["requests"][1], BUDGETS[-1], newlines="every_row")
    (kept,) = call["kept"]
    assert [kept[2]] == reference["kept"] and len(kept[2]) < kept[1]
    assert_same_answer(call, reference)
    assert only_output(call)["prompt_length"] == reference["prompt_length"]


def test_the_anyres_layout_is_vllms_merge(runs):
    (matches,) = runs["plugin"][f"b{BUDGETS[-1]} applied"]
    assert all(matches), matches


def test_two_image_sizes_in_one_batch_equal_the_requests_one_by_one(runs, hf_model):
    check_batch_equals_the_requests_one_by_one(runs, hf_model, SMALL)


def test_another_architecture_stays_stock_with_the_plugin_and_refuses_the_switch(runs):
    assert [only_output(call) for call in runs["plugin"]["llama"]] == [
        only_output(call) for call in runs["stock"]["llama"]
    ]
    error = runs["plugin"]["llama refused"]["error"]
    assert error is not None, "LLM(...) started a model the plug-in does not serve, with the switch on"
    expected = (
        'hf_overrides["flashvlm"]: flashvlm\'s vLLM plug-in does not serve LlamaForCausalLM; '
        f"it serves {', '.join(ARCHITECTURES)}"
    )
    assert expected in error, error


def test_a_second_question_reuses_the_views_tower_outputs_with_the_same_result(runs):
    reused, fresh = runs["plugin"][f"b{SMALL}"], runs["plugin"]["no reuse"]
    views = [call["tower"] for call in fresh]
    assert views[2] == views[0] and all(count > 1 for (count,) in views)  # base view + crops, in one pass
    assert [call["tower"] for call in reused] == [*views[:2], []]
    assert [call["kept"] for call in reused] == [call["kept"] for call in fresh]
    assert [call["outputs"] for call in reused] == [call["outputs"] for call in fresh]
    assert reused[-1]["kept"][0][0] != reused[0]["kept"][0][0]  # guided by the other question
