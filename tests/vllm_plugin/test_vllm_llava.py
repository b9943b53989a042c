"""The plug-in on the shipped demo model (LLaVA-1.5) against Hugging Face + flashvlm.

One job builds every engine once: stock vLLM (plug-ins disabled) in one process, and in
another the plug-in switched off, at full budget and at two budgets; some of those engines
then serve requests with settings of their own (``mm_processor_kwargs``). The tests then compare
each selection with ``flashvlm.prune`` on the transformers model as tests/agreement.py
defines it (same inputs within a tolerance, each side exactly what the method keeps on its
own inputs, near-tie swaps counted), then kept indices, greedy tokens and prompt length
exactly against transformers run on the tokens vLLM kept.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from agreement import rows_of
from scene_llava import FOLDER as SCENE_LLAVA
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers_reference import transformers_on_vllm_choice as on_vllm_choice
from transformers_reference import transformers_reference
from transformers_reference import without_eos as ids_without_eos
from vllm_harness import run_stock_and_plugin

from flashvlm.demo import EXAMPLES_DIR
from flashvlm.integrations.vllm.vision_cache import MIB
from flashvlm.loading import chat_prompt

MAX_TOKENS = 6
#: log-probabilities of vLLM (its own kernels) and transformers agree this closely in float32.
LOGPROB_TOLERANCE = 2e-3
BUDGETS = (256, 64, 28)  # 256: every token of the demo's 16 x 16 grid
#: The other methods the vLLM path serves (each needs some of saliency, CLS row, keys,
#: text, projected tokens, grid), run once each on the first example.
OTHER_METHODS = ("flashvlm:release", "visionzip", "vispruner", "divprune", "cdpruner", "pool", "random")
EOS_ID = 2
#: Bytes of one image's entry in the vision cache: the scene LLaVA's 16 x 16 tokens, each with
#: its features (128 float32) and projected token (192 float32; FlashVLM reads them), its
#: saliency (float32) and its position (int64).
ENTRY_BYTES = 256 * ((128 + 192) * 4 + 4 + 8)
#: The budget of the engine whose requests bring budgets of their own.
ENGINE_BUDGET = 64
#: Settings of three requests (the three examples): another budget, another method (the
#: release's saliency beside the default's in one tower run), a method without text.
REQUEST_SETTINGS = (
    {"budget": 16},
    {"budget": 40, "method": "flashvlm:release"},
    {"budget": 20, "method": "divprune"},
)
#: Bad per-request settings and what the error names.
BAD_REQUEST_SETTINGS = {
    "budget 0": ({"budget": 0}, "BudgetError", "budget must be >= 1"),
    "unknown method": ({"method": "nosuch"}, "FlashVLMError", "unknown method 'nosuch'"),
    "unknown parameter": ({"nosuch": 1}, "FlashVLMError", "has no parameter(s) ['nosuch']"),
    "unservable method": ({"method": "fastv"}, "MethodUnavailableError", "method 'fastv' needs lm_attention"),
}


def examples() -> list[dict]:
    rows = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    return [{"image": str(EXAMPLES_DIR / row["image"]), "question": row["question"]} for row in rows]


@pytest.fixture(scope="module")
def hf_model():
    model = LlavaForConditionalGeneration.from_pretrained(SCENE_LLAVA).eval()
    return model, AutoProcessor.from_pretrained(SCENE_LLAVA)


def requests_for(processor, rows):
    return [{"prompt": chat_prompt(processor, row["question"]), "images": [row["image"]]} for row in rows]


def with_settings(request: dict, settings: dict, **flags) -> dict:
    """``request`` with its own settings (``mm_processor_kwargs``)."""
    return {**request, "mm_processor_kwargs": {"flashvlm": settings}, **flags}


def hf_reference(
    hf_model, request: dict, budget, method: str = "flashvlm", forced: list | None = None, **prune_options
) -> dict:
    """:func:`transformers_reference.transformers_reference` on the scene LLaVA."""
    model, processor = hf_model
    return transformers_reference(
        model, processor, request, budget, method, max_tokens=MAX_TOKENS, eos_id=EOS_ID, forced=forced, **prune_options
    )


def transformers_on_vllm_choice(
    hf_model, vllm_rows: list, request: dict, budget, method: str = "flashvlm", every: bool = True, **prune_options
) -> dict | None:
    """:func:`transformers_reference.transformers_on_vllm_choice` on the scene LLaVA."""
    model, processor = hf_model
    label = f"vLLM {method} at {budget} vs transformers: {request['prompt'][-40:]!r}"
    options = dict(max_tokens=MAX_TOKENS, eos_id=EOS_ID, **prune_options)
    return on_vllm_choice(model, processor, vllm_rows, request, budget, method, every, label, **options)


def without_eos(ids: list[int]) -> list[int]:
    return ids_without_eos(ids, EOS_ID)


def recorded_rows(selections: dict, engine: str, index: int, worker: int = 0) -> list:
    """The rows of every method call ``engine`` made during its call ``index`` (on ``worker``)."""
    return rows_of(selections[engine][index][worker])


@pytest.fixture(scope="module")
def runs(hf_model, demo_vllm_folder, tmp_path_factory):
    _, processor = hf_model
    rows = examples()
    one_by_one = [[request] for request in requests_for(processor, rows)]
    image = rows[0]["image"]
    two_questions = requests_for(
        processor, [{"image": image, "question": q} for q in ("is there a red circle ?", "how many shapes are there ?")]
    )
    # Different images, one of them twice with another question, in one batch.
    mixed = requests_for(processor, [*rows, {"image": rows[1]["image"], "question": rows[0]["question"]}])
    workdir = tmp_path_factory.mktemp("vllm-llava")
    job = {"model": str(demo_vllm_folder), "max_tokens": MAX_TOKENS, "logprobs": True}
    first = one_by_one[0][0]
    # An engine started without the switch refuses a request's own settings.
    engines = [{"name": "off", "calls": [*one_by_one, [with_settings(first, {"budget": 28}, expect_error=True)]]}]
    # The two questions come one after another, so the second meets the caches the first filled.
    then_two_questions = [*one_by_one, *[[request] for request in two_questions]]
    for budget in BUDGETS:
        calls = then_two_questions if budget == BUDGETS[-1] else one_by_one
        if budget == ENGINE_BUDGET:
            # The first example at another budget, twice (the second is served from the caches);
            # bad settings, each refused; then each example with settings of its own.
            bad = [
                [with_settings(first, settings, expect_error=True)] for settings, *_ in BAD_REQUEST_SETTINGS.values()
            ]
            own = [[with_settings(request, settings)] for (request,), settings in zip(one_by_one, REQUEST_SETTINGS)]
            calls = [*one_by_one, *[[with_settings(first, {"budget": BUDGETS[-1]})]] * 2, *bad, *own]
            # Where each kind of call sits among the engine's calls.
            starts = [len(one_by_one), len(one_by_one) + 2, len(calls) - len(own), len(calls)]
            per_request = {kind: range(*starts[i : i + 2]) for i, kind in enumerate(("twice", "bad", "own"))}
        engines.append({"name": f"b{budget}", "hf_overrides": {"flashvlm": {"budget": budget}}, "calls": calls})
    # The same calls with the vision cache off, and with room for one image only.
    for name, megabytes in (("no reuse", 0), ("small cache", 1.5 * ENTRY_BYTES / MIB)):
        overrides = {"flashvlm": {"budget": BUDGETS[-1], "vision_cache_mb": megabytes}}
        engines.append({"name": name, "hf_overrides": overrides, "calls": then_two_questions})
    # The batch gets an engine of its own: with the one-by-one results in its encoder cache,
    # vLLM would rightly serve them from there instead of selecting again. After it, the
    # examples with their own settings and a request with the engine's, in one batch.
    own_batch = [
        *(with_settings(request, settings) for (request,), settings in zip(one_by_one, REQUEST_SETTINGS)),
        two_questions[1],
    ]
    overrides = {"flashvlm": {"budget": BUDGETS[-1]}}
    engines.append({"name": "batch", "hf_overrides": overrides, "calls": [mixed, own_batch]})
    two_images = {
        "prompt": chat_prompt(processor, rows[2]["question"], num_images=2),
        "images": [rows[0]["image"], rows[2]["image"]],
    }
    overrides = {"flashvlm": {"budget": BUDGETS[-1]}}
    engines.append(
        {
            "name": "two images",
            "hf_overrides": overrides,
            "engine_args": {"limit_mm_per_prompt": {"image": 2}},
            "calls": [[two_images]],
        }
    )
    for method in OTHER_METHODS:
        overrides = {"flashvlm": {"method": method, "budget": BUDGETS[-1]}}
        engines.append({"name": method, "hf_overrides": overrides, "calls": one_by_one[:1]})
    stock, plugin = run_stock_and_plugin(job, [{"name": "stock", "calls": one_by_one}], engines, workdir)
    return {
        "stock": stock["stock"],
        **plugin,
        "requests": one_by_one,
        "two": two_questions,
        "mixed": mixed,
        "own_batch": own_batch,
        "per_request": per_request,
        "two_images": two_images,
    }


def assert_same_answer(call: dict, reference: dict) -> None:
    """vLLM's greedy tokens equal transformers', and their log-probabilities agree within float32
    noise: the demo model's answer alone rarely moves when a kept token sits at a wrong
    position, its log-probabilities do."""
    (output,) = call["outputs"]
    assert without_eos(output["output_ids"]) == reference["output_ids"]
    logprobs = output["logprobs"][: len(reference["output_ids"])]
    np.testing.assert_allclose(logprobs, reference["logprobs"], atol=LOGPROB_TOLERANCE)


def only_output(call: dict) -> dict:
    (output,) = call["outputs"]
    return {"output_ids": without_eos(output["output_ids"]), "prompt_length": len(output["prompt_ids"])}


def assert_same_selection_and_answer(call: dict, reference: dict) -> None:
    """vLLM's one image kept what transformers keeps, its answer is transformers', and its
    prompt is as long (text + K, and any newlines)."""
    ((_, _, kept),) = call["kept"]
    assert [kept] == reference["kept"]
    assert_same_answer(call, reference)
    assert only_output(call)["prompt_length"] == reference["prompt_length"]


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    stock = [only_output(call) for call in runs["stock"]]
    off = [only_output(call) for call in runs["off"][: len(stock)]]
    assert off == stock
    assert all(call["kept"] == [] for call in runs["off"][: len(stock)])
    for (request,), result in zip(runs["requests"], stock):
        assert result["output_ids"] == hf_reference(hf_model, request, None)["output_ids"]


@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_tokens_and_kept_indices_equal_transformers(runs, hf_model, budget):
    calls = runs[f"b{budget}"][: len(runs["requests"])]
    stock = [only_output(call) for call in runs["stock"]]
    for index, ((request,), call, unpruned) in enumerate(zip(runs["requests"], calls, stock)):
        vllm_rows = recorded_rows(runs["selections"], f"b{budget}", index)
        reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, budget)
        result = only_output(call)
        (kept,) = call["kept"]
        assert [kept[2]] == reference["kept"]
        assert_same_answer(call, reference)
        # The prompt holds K placeholders instead of N: text + K tokens.
        assert result["prompt_length"] == unpruned["prompt_length"] - 256 + min(budget, 256)
        if budget == 256:
            assert result["output_ids"] == unpruned["output_ids"]


def test_two_questions_about_one_image_get_two_selections(runs, hf_model):
    engine = f"b{BUDGETS[-1]}"
    calls = runs[engine][-2:]
    kept = [call["kept"][0] for call in calls]
    assert kept[0][0] != kept[1][0]  # guided by different text
    first = len(runs[engine]) - 2
    for index, (request, call, selection) in enumerate(zip(runs["two"], calls, kept), start=first):
        vllm_rows = recorded_rows(runs["selections"], engine, index)
        reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, BUDGETS[-1])
        assert [selection[2]] == reference["kept"]
        assert_same_answer(call, reference)


def test_a_mixed_batch_equals_the_requests_one_by_one(runs, hf_model):
    # Every request of the batch against transformers, as the single requests are above (its
    # tower ran on its three images at once, so its features differ from theirs in the last bits).
    batch = runs["batch"][0]
    singles = runs[f"b{BUDGETS[-1]}"][: len(runs["requests"])]
    assert len(batch["kept"]) == len(batch["outputs"]) == len(runs["mixed"])
    batch_rows = recorded_rows(runs["selections"], "batch", 0)
    for request, output in zip(runs["mixed"], batch["outputs"]):
        reference = transformers_on_vllm_choice(hf_model, batch_rows, request, BUDGETS[-1], every=False)
        assert_same_answer({"outputs": [output]}, reference)
        assert len(output["prompt_ids"]) == reference["prompt_length"]
        assert reference["kept"][0] in [record[2] for record in batch["kept"]]
    lengths = [len(output["prompt_ids"]) for output in batch["outputs"]]
    assert lengths[:3] == [only_output(call)["prompt_length"] for call in singles]


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_servable_method_keeps_what_it_keeps_in_transformers(runs, hf_model, method):
    (call,) = runs[method]
    vllm_rows = recorded_rows(runs["selections"], method, 0)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, runs["requests"][0][0], BUDGETS[-1], method)
    (kept,) = call["kept"]
    if reference is None:  # VisionZip's merged tokens on a near-tie: the selection checks above hold
        return
    assert [kept[2]] == reference["kept"]
    assert_same_answer(call, reference)


def test_two_images_in_one_prompt_each_get_the_budget(runs, hf_model):
    (call,) = runs["two images"]
    vllm_rows = recorded_rows(runs["selections"], "two images", 0)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, runs["two_images"], BUDGETS[-1])
    assert [record[2] for record in call["kept"]] == reference["kept"]
    assert_same_answer(call, reference)
    assert only_output(call)["prompt_length"] == len(call["kept"][0][0]) + 2 * BUDGETS[-1]


# -- settings per request (mm_processor_kwargs={"flashvlm": {...}}) ------------------------------


def test_a_request_budget_overrides_the_engines(runs, hf_model):
    engine = f"b{ENGINE_BUDGET}"
    first = runs["per_request"]["twice"][0]
    request = with_settings(runs["requests"][0][0], {"budget": BUDGETS[-1]})
    call = runs[engine][first]
    vllm_rows = recorded_rows(runs["selections"], engine, first)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, BUDGETS[-1])
    ((_, _, kept),) = call["kept"]
    assert [kept] == reference["kept"] and len(kept) == BUDGETS[-1]
    assert_same_answer(call, reference)
    # The same image at the engine's budget (its first call) had other placeholders and tokens.
    at_engine_budget = runs[engine][0]
    assert len(at_engine_budget["kept"][0][2]) == ENGINE_BUDGET
    lengths = [only_output(c)["prompt_length"] for c in (at_engine_budget, call)]
    assert lengths == [reference["prompt_length"] - BUDGETS[-1] + ENGINE_BUDGET, reference["prompt_length"]]


def test_the_same_image_and_settings_are_served_from_the_caches(runs):
    first, again = (runs[f"b{ENGINE_BUDGET}"][index] for index in runs["per_request"]["twice"])
    assert again["kept"] == []  # no selection ran: vLLM's caches had it
    assert only_output(again) == only_output(first)


def test_bad_request_settings_are_refused_in_one_line_naming_the_value(runs):
    errors = [runs[f"b{ENGINE_BUDGET}"][index]["error"] for index in runs["per_request"]["bad"]]
    for error, (_, error_type, words) in zip(errors, BAD_REQUEST_SETTINGS.values()):
        assert error is not None and "\n" not in error, error
        assert error.startswith(f'{error_type}: mm_processor_kwargs["flashvlm"]: ') and words in error, error
    (refused,) = runs["off"][len(runs["requests"]) :]
    assert refused["error"].startswith(
        'FlashVLMError: mm_processor_kwargs["flashvlm"]: per-request settings need the engine'
    )


def test_requests_with_settings_of_their_own_keep_what_transformers_keeps(runs, hf_model):
    # They come after the refused ones: the engine goes on serving.
    engine = f"b{ENGINE_BUDGET}"
    for index, (request,), settings in zip(runs["per_request"]["own"], runs["requests"], REQUEST_SETTINGS):
        call = runs[engine][index]
        vllm_rows = recorded_rows(runs["selections"], engine, index)
        method = settings.get("method", "flashvlm")
        reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, settings["budget"], method)
        ((_, _, kept),) = call["kept"]
        assert [kept] == reference["kept"] and len(kept) == settings["budget"]
        assert_same_answer(call, reference)
        assert only_output(call)["prompt_length"] == reference["prompt_length"]


def test_a_batch_of_requests_with_different_settings_equals_them_one_by_one(runs, hf_model):
    # The examples with settings of their own and one request with the engine's, in one batch
    # of another engine than the one that served them one by one (whose caches would serve them).
    batch = runs["batch"][1]
    singles = [runs[f"b{ENGINE_BUDGET}"][index] for index in runs["per_request"]["own"]]
    assert len(batch["kept"]) == len(batch["outputs"]) == len(runs["own_batch"])
    batch_rows = recorded_rows(runs["selections"], "batch", 1)
    settings = [*REQUEST_SETTINGS, {"budget": BUDGETS[-1]}]
    for request, output, own in zip(runs["own_batch"], batch["outputs"], settings):
        method = own.get("method", "flashvlm")
        reference = transformers_on_vllm_choice(hf_model, batch_rows, request, own["budget"], method, every=False)
        assert_same_answer({"outputs": [output]}, reference)
        assert len(output["prompt_ids"]) == reference["prompt_length"]
        assert reference["kept"][0] in [record[2] for record in batch["kept"]]
    lengths = [len(output["prompt_ids"]) for output in batch["outputs"]]
    assert lengths[:3] == [only_output(call)["prompt_length"] for call in singles]


# -- one vision pass per image (the vision cache) ---------------------------------------------


def test_questions_about_one_image_run_the_tower_once(runs):
    # Images 0, 1 and 2 one by one, then image 0 twice more, each time with another question.
    engine = f"b{BUDGETS[-1]}"
    assert [call["tower"] for call in runs[engine]] == [[1], [1], [1], [], []]
    vision = runs[engine][-1]["vision"]
    assert (vision["tower_runs"], vision["images"], vision["images_encoded"]) == (3, 5, 3)
    assert (vision["entries"], vision["bytes"], vision["evictions"]) == (3, 3 * ENTRY_BYTES, 0)
    # Off, every request runs the tower.
    assert [call["tower"] for call in runs["no reuse"]] == [[1]] * 5
    assert runs["no reuse"][-1]["vision"]["capacity"] == runs["no reuse"][-1]["vision"]["entries"] == 0


@pytest.mark.parametrize("engine", ["no reuse", "small cache"])
def test_reused_tower_outputs_select_and_answer_exactly_as_a_new_tower_pass(runs, engine):
    # One image per call: every tower pass has the same shapes, so the outputs are bit-identical.
    reused = runs[f"b{BUDGETS[-1]}"]
    assert [call["kept"] for call in runs[engine]] == [call["kept"] for call in reused]
    assert [call["outputs"] for call in runs[engine]] == [call["outputs"] for call in reused]  # logprobs too


def test_a_full_vision_cache_evicts_the_least_recently_used_image(runs):
    # Room for one image: images 1 and 2 each evict the one before, so image 0's second
    # question runs the tower again (and evicts image 2), and its third finds it.
    calls = runs["small cache"]
    assert [call["tower"] for call in calls] == [[1], [1], [1], [1], []]
    vision = calls[-1]["vision"]
    assert (vision["evictions"], vision["entries"], vision["bytes"]) == (3, 1, ENTRY_BYTES)
    assert ENTRY_BYTES <= vision["capacity"] < 2 * ENTRY_BYTES


def test_one_batch_runs_the_tower_once_over_its_distinct_images(runs):
    # Four requests, three images (one asked two questions), all in one step.
    mixed, own = runs["batch"]
    assert mixed["tower"] == [3]
    assert (mixed["vision"]["images"], mixed["vision"]["images_encoded"]) == (4, 3)
    (two_images,) = runs["two images"]
    assert two_images["tower"] == [2]
    # Then the three images again, with settings of their own, and the first one with the
    # engine's: only the image whose method reads the release's saliency (which no entry
    # holds) goes through the tower; the others' methods read what their entries hold.
    assert own["tower"] == [1]
    assert own["vision"]["images_encoded"] == 4
