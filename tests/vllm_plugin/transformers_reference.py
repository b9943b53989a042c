"""What the vLLM tests compare against: transformers + flashvlm on one request, greedy.

Every family's vLLM test wraps these with its model, token budget and end-of-sequence id.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from agreement import ForcedSelection, SelectionRecorder, reference_on_our_choice

import flashvlm


def without_eos(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` up to (not including) the first end-of-sequence id."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def transformers_reference(
    model,
    processor,
    request: dict,
    budget,
    method: str = "flashvlm",
    *,
    max_tokens: int,
    eos_id: int,
    forced: list | None = None,
    add_special_tokens: bool = True,
    prepare: Callable[[dict], dict] | None = None,
    **prune_options,
) -> dict:
    """Greedy tokens (EOS and after dropped), their log-probabilities, kept indices, prompt
    length and the method's recorded calls (``rows``) for one request (``budget`` None:
    unpruned; ``forced``: the kept indices of each call, replayed; ``add_special_tokens``
    False as vLLM's chat path tokenizes; ``prepare`` changes the processor's output before
    generating; ``prune_options`` go to ``flashvlm.prune``). A request's videos are sent as
    vllm_job sends them: every frame, with its metadata."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata
    from vllm_job import video

    images = [Image.open(path).convert("RGB") for path in request.get("images", ())]
    videos = {}
    if request.get("videos"):
        frames, metadata = zip(*(video(path) for path in request["videos"]))
        described = [VideoMetadata(**{k: v for k, v in one.items() if k != "do_sample_frames"}) for one in metadata]
        videos = {"videos": list(frames), "video_metadata": described, "do_sample_frames": False}
    inputs = processor(
        images=images or None,
        text=request["prompt"],
        return_tensors="pt",
        add_special_tokens=add_special_tokens,
        **videos,
    )
    if prepare is not None:
        inputs = prepare(inputs)
    settings = {
        "do_sample": False,
        "max_new_tokens": max_tokens,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        rows = []
        if budget is None:
            generated, kept, length = model.generate(**inputs, **settings), None, inputs["input_ids"].shape[1]
        else:
            with flashvlm.prune(model, budget=budget, method=method, **prune_options) as pruner:
                selector = pruner.selector if forced is None else ForcedSelection(pruner.selector, forced)
                pruner.selector = recorder = SelectionRecorder(selector)
                generated = model.generate(**inputs, **settings)
            kept = [image.keep_indices.tolist() for image in pruner.last.images]
            length = pruner.last.pruned_length
            rows = recorder.rows()
    new_ids = without_eos(generated.sequences[0, inputs["input_ids"].shape[1] :].tolist(), eos_id)
    logprobs = [
        torch.log_softmax(step[0].float(), dim=-1)[token].item() for step, token in zip(generated.logits, new_ids)
    ]
    return {"output_ids": new_ids, "logprobs": logprobs, "kept": kept, "prompt_length": length, "rows": rows}


def transformers_on_vllm_choice(
    model, processor, vllm_rows: list, request: dict, budget, method: str, every: bool, label: str, **reference_options
) -> dict | None:
    """:func:`transformers_reference` for a request vLLM served, its selections checked against
    vLLM's recorded ``vllm_rows`` as tests/agreement.py says (``every``: False when they hold a
    whole batch's). On near-tie swaps transformers runs again on vLLM's kept indices, so the
    kept indices, greedy tokens and prompt length returned are what vLLM's must be. None where a
    merging method's near-tie cannot be replayed."""
    run = partial(transformers_reference, model, processor, request, budget, method, **reference_options)
    return reference_on_our_choice(vllm_rows, lambda forced: run(forced=forced), method, label, every)
