"""The plug-in on a tiny random Qwen2.5-VL and Qwen2-VL against Hugging Face + flashvlm.

Every test runs on both families. The models (``tiny_qwen.py``) are built from a config
(Qwen2.5-VL: window attention in blocks 0 and 2, full attention in block 1; Qwen2-VL: full
attention in all 3 blocks, in raster order; a 2-layer Qwen2 decoder with M-RoPE) and saved
with a processor built locally (the tiny word-level tokenizer of the other tests,
Qwen2VLImageProcessorPil).
Images of two sizes give two merged grids (8 x 8 and 6 x 10), each spanning several
attention windows (Qwen2.5-VL). Each selection must agree with ``flashvlm.prune`` on the transformers
model as tests/agreement.py defines it; then, against transformers run on the tokens vLLM
kept, the kept indices and greedy tokens must be equal and the generated tokens'
log-probabilities agree within float32 noise: with a random model, greedy tokens alone say little about positions, while the
log-probabilities move as soon as one kept token sits at a wrong (t, h, w).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from agreement import rows_of
from tiny_qwen import (
    EOS_ID,
    FAMILIES,
    IMAGE_TOKEN_ID,
    QUESTIONS,
    image_files,
    prompt,
    tiny_qwen,
    video_file,
    video_prompt,
)
from transformers_reference import transformers_on_vllm_choice as on_vllm_choice
from transformers_reference import transformers_reference
from transformers_reference import without_eos as ids_without_eos
from vllm_harness import run_stock_and_plugin

MAX_TOKENS = 5
FULL_BUDGET = 1.0  # a ratio: every token of any image
BUDGETS = (FULL_BUDGET, 24, 8)
#: Other methods the path serves for Qwen (features, projected tokens and text, the grid),
#: each once on the 6 x 10 image; the CLS-based ones (visionzip, vispruner) are refused.
OTHER_METHODS = ("flashvlm:release", "flashvlm:release_qwen", "divprune", "cdpruner", "pool")
CHUNK_TOKENS = 16  # fewer than an image's slots at budget 24
#: A video's budget counted for the whole video (its 2 temporal slices selected jointly), a
#: request's own setting on the engine at 8 per frame; Qwen3-VL refuses it.
PER_VIDEO = {"flashvlm": {"budget": 12, "video_budget": "per_video"}}
#: log-probabilities of vLLM (its own kernels) and transformers agree this closely in float32.
LOGPROB_TOLERANCE = 2e-3


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tiny_qwen_vllm, tmp_path_factory):
    if request.param == tiny_qwen_vllm["family"]:
        return tiny_qwen_vllm  # the session's, which the other modules serve too
    return tiny_qwen(tmp_path_factory.mktemp("qwen-vllm"), request.param)


def hf_reference(qwen, request: dict, budget, method: str = "flashvlm", forced: list | None = None) -> dict:
    """:func:`transformers_reference.transformers_reference` on the tiny Qwen-VL."""
    model, processor = qwen["model"], qwen["processor"]
    return transformers_reference(
        model, processor, request, budget, method, max_tokens=MAX_TOKENS, eos_id=EOS_ID, forced=forced
    )


def transformers_on_vllm_choice(
    qwen, vllm_rows: list, request: dict, budget, method: str = "flashvlm", every: bool = True
) -> dict | None:
    """:func:`transformers_reference.transformers_on_vllm_choice` on the tiny Qwen-VL."""
    label = f"vLLM {qwen['family']} {method} at {budget} vs transformers: {request['prompt'][-40:]!r}"
    options = dict(max_tokens=MAX_TOKENS, eos_id=EOS_ID)
    return on_vllm_choice(qwen["model"], qwen["processor"], vllm_rows, request, budget, method, every, label, **options)


def without_eos(ids: list[int]) -> list[int]:
    return ids_without_eos(ids, EOS_ID)


@pytest.fixture(scope="module")
def runs(qwen, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-qwen")
    images = image_files(workdir)
    singles = [{"prompt": prompt(question), "images": [image]} for image, question in zip(images, QUESTIONS)]
    one_by_one = [[request] for request in singles]
    two_images = {"prompt": prompt(QUESTIONS[0], num_images=2), "images": images}
    job = {
        "model": str(qwen["folder"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        # Images only: no dummy videos while vLLM profiles (the tiny folder has no real video processor use).
        "engine_args": {"limit_mm_per_prompt": {"image": 2, "video": 0}},
    }
    engines = [{"name": "off", "calls": one_by_one}]
    # At the smallest budget the second image is then asked the first question (its tower
    # outputs are reused), and both images come again in one prompt (both reused).
    again = [{"prompt": prompt(QUESTIONS[0]), "images": [images[1]]}]
    for budget in BUDGETS:
        calls = [*one_by_one, again, [two_images]] if budget == BUDGETS[-1] else one_by_one
        if budget == BUDGETS[1]:  # then the first image with a budget of its own
            calls = [*one_by_one, [{**singles[0], "mm_processor_kwargs": {"flashvlm": {"budget": BUDGETS[-1]}}}]]
        engines.append({"name": f"b{budget}", "hf_overrides": {"flashvlm": {"budget": budget}}, "calls": calls})
    no_reuse = {"flashvlm": {"budget": BUDGETS[-1], "vision_cache_mb": 0}}
    engines.append({"name": "no reuse", "hf_overrides": no_reuse, "calls": [*one_by_one, again]})
    # Its own engine: with the one-by-one selections in its encoder cache, vLLM would serve them from there.
    engines.append({"name": "batch", "hf_overrides": {"flashvlm": {"budget": BUDGETS[-1]}}, "calls": [singles]})
    # Prefill in chunks of 16 tokens: each image's 24 slots are split between two steps.
    chunked = {"max_num_batched_tokens": CHUNK_TOKENS, "enable_chunked_prefill": True}
    overrides = {"flashvlm": {"budget": BUDGETS[1]}}
    engines.append({"name": "chunked", "hf_overrides": overrides, "engine_args": chunked, "calls": one_by_one})
    for method in OTHER_METHODS:
        overrides = {"flashvlm": {"method": method, "budget": BUDGETS[-1]}}
        engines.append({"name": method, "hf_overrides": overrides, "calls": one_by_one[1:]})
    # vLLM's own video pruning (EVS) beside flashvlm: refused when the model is built.
    evs = {"video_pruning_rate": 0.5}
    engines.append(
        {"name": "evs", "hf_overrides": {"flashvlm": {"budget": 8}}, "engine_args": evs, "expect_error": True}
    )
    # A video, last, on the stock engine and the smallest budget's (each allowed one video):
    # pruned per frame, then with a per-video budget of its own (refused by Qwen3-VL).
    video = {"prompt": video_prompt(QUESTIONS[0]), "videos": [video_file(workdir)]}
    per_video = {**video, "mm_processor_kwargs": PER_VIDEO}
    if qwen["family"].startswith("Qwen3"):
        per_video["expect_error"] = True
    with_video = {"limit_mm_per_prompt": {"image": 2, "video": 1}}
    smallest = engines[len(BUDGETS)]
    smallest.update(engine_args=with_video, calls=[*smallest["calls"], [video], [per_video]])
    stock_engines = [{"name": "stock", "engine_args": with_video, "calls": [*one_by_one, [video]]}]
    stock, plugin = run_stock_and_plugin(job, stock_engines, engines, workdir)
    calls, selections = plugin[smallest["name"]], plugin["selections"][smallest["name"]]
    videos = {"stock": stock["stock"].pop(), "request": video, "per_video": (calls.pop(), selections.pop())}
    videos["per_frame"] = (calls.pop(), selections.pop())
    return {"stock": stock["stock"], **plugin, "singles": singles, "two_images": two_images, "videos": videos}


def only_output(call: dict) -> dict:
    (output,) = call["outputs"]
    return output_summary(output)


def output_summary(output: dict) -> dict:
    length = len(without_eos(output["output_ids"]))
    return {
        "output_ids": output["output_ids"][:length],
        "logprobs": output["logprobs"][:length],
        "prompt_length": len(output["prompt_ids"]),
    }


def assert_matches(result: dict, reference: dict) -> None:
    assert result["output_ids"] == reference["output_ids"]
    np.testing.assert_allclose(result["logprobs"], reference["logprobs"], atol=LOGPROB_TOLERANCE)


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, qwen):
    stock = [only_output(call) for call in runs["stock"]]
    off = [only_output(call) for call in runs["off"]]
    assert [r["output_ids"] for r in off] == [r["output_ids"] for r in stock]
    for result, unpruned in zip(off, stock):
        np.testing.assert_allclose(result["logprobs"], unpruned["logprobs"], atol=1e-5)
    assert all(call["kept"] == [] for call in runs["off"])
    for request, result in zip(runs["singles"], stock):
        assert_matches(result, hf_reference(qwen, request, None))


@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_tokens_and_kept_indices_equal_transformers(runs, qwen, budget):
    calls = runs[f"b{budget}"][: len(runs["singles"])]
    stock = [only_output(call) for call in runs["stock"]]
    for index, (request, call, unpruned) in enumerate(zip(runs["singles"], calls, stock)):
        vllm_rows = rows_of(runs["selections"][f"b{budget}"][index][0])
        reference = transformers_on_vllm_choice(qwen, vllm_rows, request, budget)
        result = only_output(call)
        ((_, num_tokens, kept),) = call["kept"]
        assert [kept] == reference["kept"]
        assert_matches(result, reference)
        # The prompt holds K placeholders instead of N: text + K tokens.
        assert result["prompt_length"] == unpruned["prompt_length"] - num_tokens + len(kept)
        if budget == FULL_BUDGET:
            assert len(kept) == num_tokens
            assert_matches(result, unpruned)


def test_two_images_of_different_sizes_in_one_prompt_keep_their_positions(runs, qwen):
    engine = f"b{BUDGETS[-1]}"
    call = runs[engine][-1]
    vllm_rows = rows_of(runs["selections"][engine][len(runs[engine]) - 1][0])
    reference = transformers_on_vllm_choice(qwen, vllm_rows, runs["two_images"], BUDGETS[-1])
    assert [record[1] for record in call["kept"]] == [64, 60]
    assert [record[2] for record in call["kept"]] == reference["kept"]
    assert_matches(only_output(call), reference)


def test_a_batch_of_two_image_sizes_equals_the_requests_one_by_one(runs, qwen):
    # Each request of the batch against transformers, as the single requests are above (the
    # batch's images reach the tower together: its features differ from theirs in the last bits).
    (batch,) = runs["batch"]
    singles = runs[f"b{BUDGETS[-1]}"][: len(runs["singles"])]
    got = [output_summary(output) for output in batch["outputs"]]
    assert [r["prompt_length"] for r in got] == [only_output(call)["prompt_length"] for call in singles]
    batch_rows = rows_of(runs["selections"]["batch"][0][0])
    for request, result in zip(runs["singles"], got):
        reference = transformers_on_vllm_choice(qwen, batch_rows, request, BUDGETS[-1], every=False)
        assert_matches(result, reference)
        assert reference["kept"][0] in [record[2] for record in batch["kept"]]


def test_a_prefill_in_chunks_that_split_an_image_equals_one_prefill(runs):
    whole = runs[f"b{BUDGETS[1]}"][: len(runs["singles"])]
    assert [call["kept"] for call in runs["chunked"]] == [call["kept"] for call in whole]
    for chunked_call, whole_call in zip(runs["chunked"], whole):
        result, expected = only_output(chunked_call), only_output(whole_call)
        assert (result["output_ids"], result["prompt_length"]) == (expected["output_ids"], expected["prompt_length"])
        np.testing.assert_allclose(result["logprobs"], expected["logprobs"], atol=1e-5)
    # Each prompt has text before its image, so a 16-token chunk ends inside the 24 slots.
    for call in runs["chunked"]:
        first_slot = call["outputs"][0]["prompt_ids"].index(IMAGE_TOKEN_ID)
        assert first_slot < CHUNK_TOKENS < first_slot + BUDGETS[1]


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_servable_method_keeps_what_it_keeps_in_transformers(runs, qwen, method):
    (call,) = runs[method]
    vllm_rows = rows_of(runs["selections"][method][0][0])
    reference = transformers_on_vllm_choice(qwen, vllm_rows, runs["singles"][1], BUDGETS[-1], method)
    ((_, _, kept),) = call["kept"]
    assert [kept] == reference["kept"]
    assert_matches(only_output(call), reference)


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_methods_that_read_a_cls_row_are_refused_at_start_up(method):
    from types import SimpleNamespace

    from flashvlm.errors import MethodUnavailableError
    from flashvlm.integrations.vllm.qwen_vl import QWEN_SERVED_REQUIREMENTS
    from flashvlm.integrations.vllm.settings import settings_of

    config = SimpleNamespace(flashvlm={"method": method, "budget": 8})
    with pytest.raises(MethodUnavailableError, match=r"needs cls_attention \(the CLS token's attention row"):
        settings_of(config, QWEN_SERVED_REQUIREMENTS)


def video_reference(qwen, videos: dict, which: str, budget, **prune_options) -> tuple[dict, dict, dict]:
    """vLLM's call for a video (``which``: "per_frame" or "per_video"), its summary, and
    transformers + flashvlm on the same video.

    Transformers gets the prompt as stock vLLM expanded it: the tests' word-level tokenizer
    spells Qwen3-VL's frame markers and timestamps its own way in transformers' processor,
    while vLLM lays them out from the config's token ids.
    """
    stock = videos["stock"]["outputs"][0]["prompt_ids"]
    video_token = qwen["model"].config.video_token_id

    def vllm_prompt(inputs):
        ids = torch.tensor([stock])
        assert int((ids == video_token).sum()) == int((inputs["input_ids"] == video_token).sum())
        inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
        inputs["mm_token_type_ids"] = 2 * (ids == video_token).long()
        return inputs

    call, selections = videos[which]
    label = f"vLLM {qwen['family']} video at {budget} {prune_options} vs transformers"
    options = dict(max_tokens=MAX_TOKENS, eos_id=EOS_ID, prepare=vllm_prompt, **prune_options)
    model, processor = qwen["model"], qwen["processor"]
    rows = rows_of(selections[0])
    reference = on_vllm_choice(model, processor, rows, videos["request"], budget, "flashvlm", True, label, **options)
    return call, only_output(call), reference


def test_a_video_keeps_per_frame_what_transformers_keeps(runs, qwen):
    # K slots per temporal slice; each kept token at its slice's (t, h, w), the temporal offset
    # at Qwen2.5-VL's t factor: the log-probabilities move as soon as one sits elsewhere.
    budget = BUDGETS[-1]
    call, result, reference = video_reference(qwen, runs["videos"], "per_frame", budget)
    ((_, num_tokens, kept),) = call["kept"]
    frames = reference["kept"]  # one unit per temporal slice
    per_frame = num_tokens // len(frames)
    assert [len(frame) for frame in frames] == [budget] * len(frames) == [budget, budget]
    assert kept == [index + slice_ * per_frame for slice_, frame in enumerate(frames) for index in frame]
    assert_matches(result, reference)
    stock = only_output(runs["videos"]["stock"])
    assert result["prompt_length"] == reference["prompt_length"] == stock["prompt_length"] - num_tokens + len(kept)


def test_a_video_budget_per_video_selects_its_frames_jointly_or_is_refused(runs, qwen):
    call, _ = runs["videos"]["per_video"]
    if qwen["family"].startswith("Qwen3"):  # one placeholder run per frame: no count per frame to fix
        error = call["error"]
        assert error is not None and "video_budget='per_video' is not served for this model" in error, error
        return
    budget = PER_VIDEO["flashvlm"]["budget"]
    call, result, reference = video_reference(qwen, runs["videos"], "per_video", budget, video_budget="per_video")
    ((_, num_tokens, kept),) = call["kept"]
    assert [kept] == reference["kept"] and len(kept) == budget
    assert_matches(result, reference)
    stock = only_output(runs["videos"]["stock"])
    assert result["prompt_length"] == stock["prompt_length"] - num_tokens + budget


def test_evs_video_pruning_beside_flashvlm_is_refused_at_start_up_in_one_line(runs):
    error = runs["evs"]["error"]
    assert error is not None and "video_pruning_rate=0.5: vLLM's EVS prunes videos" in error, error


def test_a_request_budget_overrides_the_engines(runs, qwen):
    # The engine at 24 serves the first image at 8: its own slots, the positions of 8 kept tokens.
    engine = f"b{BUDGETS[1]}"
    index = len(runs["singles"])
    call = runs[engine][index]
    vllm_rows = rows_of(runs["selections"][engine][index][0])
    reference = transformers_on_vllm_choice(qwen, vllm_rows, runs["singles"][0], BUDGETS[-1])
    ((_, _, kept),) = call["kept"]
    assert [kept] == reference["kept"] and len(kept) == BUDGETS[-1]
    result = only_output(call)
    assert_matches(result, reference)
    assert result["prompt_length"] == only_output(runs[engine][0])["prompt_length"] - BUDGETS[1] + BUDGETS[-1]


def test_a_second_question_reuses_the_tower_outputs_with_the_same_result(runs):
    reused, fresh = runs[f"b{BUDGETS[-1]}"], runs["no reuse"]
    assert [call["tower"] for call in fresh] == [[1], [1], [1]]
    assert [call["tower"] for call in reused] == [[1], [1], [], []]  # the two-image prompt too
    assert [call["kept"] for call in reused[:3]] == [call["kept"] for call in fresh]
    assert [call["outputs"] for call in reused[:3]] == [call["outputs"] for call in fresh]
    vision = reused[-1]["vision"]
    assert (vision["tower_runs"], vision["images"], vision["images_encoded"], vision["entries"]) == (2, 5, 2, 2)
    (batch,) = runs["batch"]
    assert batch["tower"] == [2]  # two images, one pass
    # A request's own budget reads the same tower outputs (its method's needs are the engine's).
    assert runs[f"b{BUDGETS[1]}"][-1]["tower"] == []
