"""Run prompts through vLLM engines and write what came out: ``python vllm_job.py JOB.json OUT.json``.

JOB.json::

    {"model": PATH, "max_tokens": 6, "engine_args": {...},
     "engines": [{"name": "b28", "hf_overrides": {...} | null, "engine_args": {...},
                  "calls": [[{"prompt": STR, "images": [PNG, ...]}, ...], ...]}]}

Each call is one ``LLM.generate`` (a batch); engines are built one after another in this
process. OUT.json maps each engine's name to its calls, each a list of
``{"prompt_ids", "output_ids", "kept"}``, where ``kept`` lists what the plug-in selected
during that call (``[text_ids, num_tokens, keep_indices]`` per image, in encoder order).
With ``"logprobs": true`` in JOB.json each output also has ``"logprobs"``: the log-probability
of each generated token.
"""

from __future__ import annotations

import gc
import json
import sys


def main(job_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from flashvlm.integrations.vllm.encoder import flashvlm_history

    job = json.loads(open(job_path).read())
    with_logprobs = job.get("logprobs", False)
    sampling = SamplingParams(
        temperature=0.0, max_tokens=job.get("max_tokens", 6), logprobs=1 if with_logprobs else None
    )
    results = {}
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
        llm = LLM(**arguments)
        seen = 0
        calls = []
        for call in engine["calls"]:
            requests = [
                {
                    "prompt": request["prompt"],
                    "multi_modal_data": {"image": [Image.open(path).convert("RGB") for path in request["images"]]},
                }
                for request in call
            ]
            outputs = llm.generate(requests, sampling, use_tqdm=False)
            history = [record for worker in llm.apply_model(flashvlm_history) for record in worker]
            kept = [[list(r.text_ids), r.num_tokens, list(r.keep_indices)] for r in history[seen:]]
            seen = len(history)
            calls.append(
                {
                    "outputs": [output_record(o, with_logprobs) for o in outputs],
                    "kept": kept,
                }
            )
        results[engine["name"]] = calls
        del llm
        gc.collect()
    with open(out_path, "w") as handle:
        json.dump(results, handle)


def output_record(output, with_logprobs: bool) -> dict:
    completion = output.outputs[0]
    record = {"prompt_ids": list(output.prompt_token_ids), "output_ids": list(completion.token_ids)}
    if with_logprobs:
        record["logprobs"] = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
    return record


if __name__ == "__main__":
    main(*sys.argv[1:3])
