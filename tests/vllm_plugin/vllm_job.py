"""Run prompts through vLLM engines and write what came out: ``python vllm_job.py JOB.json OUT.json``.

JOB.json::

    {"model": PATH, "max_tokens": 6, "engine_args": {...},
     "engines": [{"name": "b28", "hf_overrides": {...} | null, "engine_args": {...},
                  "calls": [[{"prompt": STR, "images": [PNG, ...], "videos": [NPY, ...],
                              "mm_processor_kwargs": {...}}, ...], ...]}]}

Each call is one ``LLM.generate`` (a batch); engines are built one after another in this
process. OUT.json maps each engine's name to its calls, each a list of
``{"prompt_ids", "output_ids", "kept"}``, where ``kept`` lists what the plug-in selected
during that call (``[text_ids, num_tokens, keep_indices]`` per image, in encoder order;
the first worker's, and ``"ranks_kept"`` has every worker's, for tensor parallelism),
``"tower"`` the vision tower's passes during that call (inputs per pass: images, or AnyRes
views), and ``"vision"`` the plug-in's vision-cache counters after it (None when stock), each
the first worker's (``"ranks_tower"`` and ``"ranks_vision"`` have every worker's).
A request without images is sent as text alone; ``mm_processor_kwargs`` is optional. A call
whose request has ``"expect_error": true`` must fail: its entry is ``{"error": "Type: message"}``
(or ``{"error": null}`` when it ran), and the engine goes on. An engine may name
``"apply": "module:function"``: after its calls, ``LLM.apply_model(function)`` runs, and its
result (one per worker) is stored under ``"NAME applied"``. An engine with
``"expect_error": true`` is one whose ``LLM(...)`` must fail: its entry is
``{"error": "Type: message"}`` (or ``{"error": null}`` when it started), and the job goes on.
With ``"logprobs": true`` in JOB.json each output also has ``"logprobs"``: the log-probability
of each generated token.

Every pruned engine's method is wrapped in ``agreement.SelectionRecorder``: each call's
inputs and kept indices are saved beside OUT.json as ``OUT.json.selections.pt``
(engine name -> calls -> workers -> recorded calls), for ``agreement.check_same_selection``.
With ``FLASHVLM_TEST_PERTURBATION`` set, the recorder perturbs those inputs first.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the agreement module
from agreement import call_from_plain, start_recording, take_recorded_calls  # noqa: E402


def video(path: str) -> tuple:
    """A video as vLLM takes it: its (F, H, W, 3) uint8 frames (a ``.npy`` file) and their
    metadata, two frames per second, every frame sent (Qwen3-VL needs the metadata)."""
    import numpy as np

    frames = np.load(path)
    count = len(frames)
    metadata = {
        "fps": 2.0,
        "duration": count / 2.0,
        "total_num_frames": count,
        "frames_indices": list(range(count)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return frames, metadata


def main(job_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from flashvlm.integrations.vllm.pruned_model import flashvlm_history
    from flashvlm.integrations.vllm.vision_cache import count_tower_passes, flashvlm_vision_stats, take_tower_passes

    job = json.loads(open(job_path).read())
    with_logprobs = job.get("logprobs", False)
    sampling = SamplingParams(
        temperature=0.0, max_tokens=job.get("max_tokens", 6), logprobs=1 if with_logprobs else None
    )
    results, selections = {}, {}
    for engine in job["engines"]:
        arguments = {
            "model": job["model"],
            "dtype": "float32",
            "max_model_len": 512,
            "enforce_eager": True,
            "max_num_seqs": 8,
            "seed": 0,
            **job.get("engine_args", {}),
            **engine.get("engine_args", {}),
        }
        if engine.get("hf_overrides") is not None:
            arguments["hf_overrides"] = engine["hf_overrides"]
        if engine.get("expect_error"):
            results[engine["name"]] = {"error": start_error(LLM, arguments)}
            continue
        llm = LLM(**arguments)
        llm.apply_model(start_recording)
        llm.apply_model(count_tower_passes)
        seen = None  # records already reported, per worker
        calls = []
        recorded = selections[engine["name"]] = []
        for call in engine["calls"]:
            requests = [{"prompt": request["prompt"]} for request in call]
            for sent, request in zip(requests, call):
                if request.get("images"):
                    images = [Image.open(path).convert("RGB") for path in request["images"]]
                    sent["multi_modal_data"] = {"image": images}
                if request.get("videos"):
                    sent.setdefault("multi_modal_data", {})["video"] = [video(path) for path in request["videos"]]
                if request.get("mm_processor_kwargs"):
                    sent["mm_processor_kwargs"] = request["mm_processor_kwargs"]
            if any(request.get("expect_error") for request in call):
                calls.append({"error": call_error(llm, requests, sampling)})
                recorded.append([])
                continue
            outputs = llm.generate(requests, sampling, use_tqdm=False)
            # One history per worker: with tensor parallelism every rank selects, and all must agree.
            histories = llm.apply_model(flashvlm_history)
            seen = seen or [0] * len(histories)
            ranks_kept = [
                [[list(r.text_ids), r.num_tokens, list(r.keep_indices)] for r in history[start:]]
                for history, start in zip(histories, seen)
            ]
            seen = [len(history) for history in histories]
            kept = ranks_kept[0]
            per_worker = llm.apply_model(take_recorded_calls)
            recorded.append([[call_from_plain(plain) for plain in worker] for worker in per_worker])
            ranks_tower, ranks_vision = llm.apply_model(take_tower_passes), llm.apply_model(flashvlm_vision_stats)
            calls.append(
                {
                    "outputs": [output_record(o, with_logprobs) for o in outputs],
                    "kept": kept,
                    "ranks_kept": ranks_kept,
                    "tower": ranks_tower[0],
                    "ranks_tower": ranks_tower,
                    "vision": ranks_vision[0],
                    "ranks_vision": ranks_vision,
                }
            )
        results[engine["name"]] = calls
        if engine.get("apply"):
            module_name, function_name = engine["apply"].split(":")
            function = getattr(importlib.import_module(module_name), function_name)
            results[f"{engine['name']} applied"] = llm.apply_model(function)
        del llm
        gc.collect()
    with open(out_path, "w") as handle:
        json.dump(results, handle)
    import torch

    torch.save(selections, f"{out_path}.selections.pt")


def output_record(output, with_logprobs: bool) -> dict:
    completion = output.outputs[0]
    record = {"prompt_ids": list(output.prompt_token_ids), "output_ids": list(completion.token_ids)}
    if with_logprobs:
        record["logprobs"] = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
    return record


def call_error(llm, requests: list[dict], sampling) -> str | None:
    """What ``llm.generate(requests)`` raised, as "Type: message", or None when it ran."""
    try:
        llm.generate(requests, sampling, use_tqdm=False)
    except Exception as error:  # the test reads which error it was
        return f"{type(error).__name__}: {error}"
    return None


def start_error(LLM, arguments: dict) -> str | None:
    """What ``LLM(**arguments)`` raised, as "Type: message", or None when it started."""
    try:
        llm = LLM(**arguments)
    except Exception as error:  # the test reads which error it was
        return f"{type(error).__name__}: {error}"
    del llm
    gc.collect()
    return None


if __name__ == "__main__":
    main(*sys.argv[1:3])
