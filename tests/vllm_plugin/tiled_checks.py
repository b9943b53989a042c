"""Checks both tiled families' vLLM tests run (InternVL, Idefics3), on the ``runs`` their
fixtures return: ``{"stock": [calls], "plugin": {engine: calls, "selections": ...}, "images":
[one request per image], "calls": {name: request}, "at": {name: index}}``, with plug-in engines
``off``, ``pruned`` (calls by name) and ``batch`` (every image in one call). ``flags`` are the
options transformers runs with to make the family's rule (Idefics3: ``tile_budget="per_tile"``)."""

from __future__ import annotations

from test_vllm_llava import (
    EOS_ID,
    MAX_TOKENS,
    assert_same_answer,
    assert_same_selection_and_answer,
    only_output,
    recorded_rows,
    transformers_on_vllm_choice,
)


def check_image(runs, hf_model, name: str, budget, method="flashvlm", engine: str = "pruned", **flags) -> dict:
    """vLLM's call ``name`` on ``engine`` (one image) kept what transformers keeps, with its answer."""
    index = runs["at"][name]
    call, vllm_rows = runs["plugin"][engine][index], recorded_rows(runs["plugin"]["selections"], engine, index)
    reference = transformers_on_vllm_choice(hf_model, vllm_rows, runs["calls"][name], budget, method, **flags)
    assert_same_selection_and_answer(call, reference)
    return call


def check_plugin_off(runs, hf_model, requests: list[dict]) -> None:
    """The plug-in's ``off`` engine answers ``requests`` as stock vLLM and as transformers do."""
    from transformers_reference import transformers_reference

    model, processor = hf_model
    off = [only_output(call) for call in runs["plugin"]["off"]]
    assert off == [only_output(call) for call in runs["stock"]]
    assert all(call["kept"] == [] for call in runs["plugin"]["off"])
    for request, result in zip(requests, off):
        reference = transformers_reference(model, processor, request, None, max_tokens=MAX_TOKENS, eos_id=EOS_ID)
        assert result == {"output_ids": reference["output_ids"], "prompt_length": reference["prompt_length"]}


def check_batch(runs, hf_model, budget, **flags) -> None:
    """Each request of the batch against transformers, as the single requests are (the batch's
    tiles reach the tower together: its features differ from theirs in the last bits)."""
    (batch,) = runs["plugin"]["batch"]
    singles = [runs["plugin"]["pruned"][runs["at"][f"image{index}"]] for index in range(len(runs["images"]))]
    batch_rows = recorded_rows(runs["plugin"]["selections"], "batch", 0)
    batch_kept = [record[2] for record in batch["kept"]]
    for request, output, single in zip(runs["images"], batch["outputs"], singles):
        reference = transformers_on_vllm_choice(hf_model, batch_rows, request, budget, every=False, **flags)
        assert_same_answer({"outputs": [output]}, reference)
        assert len(output["prompt_ids"]) == reference["prompt_length"] == only_output(single)["prompt_length"]
        assert reference["kept"][0] in batch_kept


def check_second_question(runs, hf_model, budget, **flags) -> None:
    """A second question about image 0 (call ``again``) runs no tower pass, is guided by its own
    question, and keeps what transformers keeps."""
    calls, at = runs["plugin"]["pruned"], runs["at"]
    assert calls[at["image0"]]["tower"] != [] and calls[at["again"]]["tower"] == []  # the same image
    assert calls[at["image0"]]["kept"][0][0] != calls[at["again"]]["kept"][0][0]  # guided by the other question
    check_image(runs, hf_model, "again", budget, **flags)
