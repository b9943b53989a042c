"""Checks both AnyRes families' vLLM tests run (LLaVA-NeXT, LLaVA-OneVision), on the ``runs``
their fixtures return: ``{"stock": {engine: calls}, "plugin": {engine: calls, "selections": ...},
"requests": [one request per image size]}``, with plug-in engines ``off``, ``b{budget}`` and
``batch``. vLLM keeps every crop row's newline, so transformers runs with ``newlines="every_row"``.
And one check of a video's selection (:func:`check_video_equals_transformers`), which the
LLaVA-OneVision and LLaVA-NeXT-Video tests share."""

from __future__ import annotations

from test_vllm_llava import (
    assert_same_answer,
    assert_same_selection_and_answer,
    hf_reference,
    only_output,
    recorded_rows,
    transformers_on_vllm_choice,
)


def check_plugin_off_is_stock_vllm_and_equals_transformers(runs: dict, hf_model) -> None:
    stock = [only_output(call) for call in runs["stock"]["stock"]]
    assert [only_output(call) for call in runs["plugin"]["off"]] == stock
    assert all(call["kept"] == [] for call in runs["plugin"]["off"])
    for request, result in zip(runs["requests"], stock):
        reference = hf_reference(hf_model, request, None)
        assert result == {"output_ids": reference["output_ids"], "prompt_length": reference["prompt_length"]}


def check_each_request_equals_transformers(runs: dict, hf_model, budget, full_budget) -> None:
    """At ``budget``, each one-by-one request's kept indices, answer and prompt length are
    transformers'; at ``full_budget`` the plug-in's answers are also stock vLLM's."""
    engine = f"b{budget}"
    calls = runs["plugin"][engine][: len(runs["requests"])]
    for index, (request, call) in enumerate(zip(runs["requests"], calls)):
        vllm_rows = recorded_rows(runs["plugin"]["selections"], engine, index)
        reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, budget, newlines="every_row")
        assert_same_selection_and_answer(call, reference)
    if budget == full_budget:
        assert [only_output(call) for call in calls] == [only_output(call) for call in runs["stock"]["stock"]]


def check_batch_equals_the_requests_one_by_one(runs: dict, hf_model, budget) -> None:
    """The ``batch`` engine's one call (every request, one image size each) against transformers
    request by request, as the single requests at ``budget`` are (the batch's views reach the tower
    together: its features differ from theirs in the last bits); the two sizes, two lengths."""
    (batch,) = runs["plugin"]["batch"]
    singles = runs["plugin"][f"b{budget}"][: len(runs["requests"])]
    batch_rows = recorded_rows(runs["plugin"]["selections"], "batch", 0)
    for request, output in zip(runs["requests"], batch["outputs"]):
        reference = transformers_on_vllm_choice(
            hf_model, batch_rows, request, budget, every=False, newlines="every_row"
        )
        assert_same_answer({"outputs": [output]}, reference)
        assert len(output["prompt_ids"]) == reference["prompt_length"]
    lengths = [len(output["prompt_ids"]) for output in batch["outputs"]]
    assert lengths == [only_output(call)["prompt_length"] for call in singles]
    assert len(set(lengths)) == 2


def check_video_equals_transformers(
    hf_model,
    call: dict,
    vllm_rows: list,
    request: dict,
    stock_call: dict,
    settings: dict,
    frames: tuple[int, int],
    method: str = "flashvlm",
    **prune_options,
) -> None:
    """vLLM's ``call`` for one video (its recorded ``vllm_rows``, its request's ``settings``) kept
    what transformers keeps with them, ``budget`` per frame or in all, with transformers' answer
    and prompt length (``stock_call``'s, less the tokens dropped). ``frames``: (frames, tokens
    per frame) of the video."""
    num_frames, frame_tokens = frames
    per_video = settings.get("video_budget") == "per_video"
    video_budget = {"video_budget": settings.get("video_budget", "per_frame")}
    options = {**prune_options, **video_budget}
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, settings["budget"], method, **options)
    ((_, num_tokens, kept),) = call["kept"]
    assert num_tokens == num_frames * frame_tokens
    units = reference["kept"]  # one per frame (indices within it), or one for the video
    assert len(units) == (1 if per_video else num_frames)
    unit_size = num_tokens if per_video else frame_tokens
    assert kept == [index + unit * unit_size for unit, indices in enumerate(units) for index in indices]
    assert len(kept) == (settings["budget"] if per_video else num_frames * settings["budget"])
    assert_same_answer(call, reference)
    stock = only_output(stock_call)
    length = only_output(call)["prompt_length"]
    assert length == reference["prompt_length"] == stock["prompt_length"] - num_tokens + len(kept)
