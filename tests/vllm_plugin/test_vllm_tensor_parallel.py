"""Tensor parallelism: with TP = 2 every rank selects the same tokens as transformers + flashvlm.

Opt-in (``make vllm-test-tp``; about 3 minutes on two cores): TP = 2 on a CPU runs two
worker processes, one core each (``VLLM_CPU_OMP_THREADS_BIND``), which doubles the cost of
the demo model's engines, so CI's ``make vllm-test`` leaves it out. Each rank's vision
tower holds half the heads: the saliency is the mean of the ranks' head means, VisionZip's
keys are gathered across ranks (``pruned_model.py``), and the test checks that both collectives
make every rank keep what the unsharded model keeps: the ranks exactly the same tokens
(their inputs are the collectives' results, identical on every rank), and rank 0 what
transformers keeps as tests/agreement.py defines it. A last request asks the first image
another question: for FlashVLM both ranks take its tower outputs from their vision caches,
neither runs the tower (and its collectives) alone (VisionZip reads no text, so vLLM's own
encoder cache serves its first selection again).
"""

from __future__ import annotations

import os

import pytest
from test_vllm_llava import (  # noqa: F401
    MAX_TOKENS,
    assert_same_answer,
    examples,
    hf_model,
    recorded_rows,
    requests_for,
    transformers_on_vllm_choice,
)
from vllm_harness import run_jobs

pytestmark = pytest.mark.skipif(
    os.environ.get("FLASHVLM_VLLM_TP") != "1", reason="opt-in: make vllm-test-tp (FLASHVLM_VLLM_TP=1)"
)

BUDGET = 28
#: flashvlm reads the saliency (all-reduced head means); visionzip also reads the keys (all-gathered).
METHODS = ("flashvlm", "visionzip")
TP_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",  # one core per rank: vLLM CPU binds by NUMA node, and there is one
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # apply_model sends the history reader to the worker processes
}


@pytest.fixture(scope="module")
def runs(hf_model, demo_vllm_folder, tmp_path_factory):  # noqa: F811
    _, processor = hf_model
    rows = examples()
    one_by_one = [[request] for request in requests_for(processor, rows)]
    # Then the first image with the second image's question: its tower outputs are reused on both ranks.
    again = [requests_for(processor, [{"image": rows[0]["image"], "question": rows[1]["question"]}])]
    engine_args = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    engines = [
        {
            "name": method,
            "hf_overrides": {"flashvlm": {"method": method, "budget": BUDGET}},
            "engine_args": engine_args,
            "calls": [*one_by_one, *again],
        }
        for method in METHODS
    ]
    job = {"model": str(demo_vllm_folder), "max_tokens": MAX_TOKENS, "logprobs": True, "engines": engines}
    (result,) = run_jobs([(job, tmp_path_factory.mktemp("vllm-tp"), True)], in_process=False, extra_env=TP_ENV)
    return {**result, "requests": [*one_by_one, *again]}


@pytest.mark.parametrize("method", METHODS)
def test_every_rank_keeps_what_transformers_keeps(runs, hf_model, method):  # noqa: F811
    for index, ((request,), call) in enumerate(zip(runs["requests"], runs[method])):
        assert len(call["ranks_kept"]) == 2
        assert call["ranks_kept"][0] == call["ranks_kept"][1]
        # Every rank reuses or runs the tower together, and its vision cache holds the same.
        assert call["ranks_tower"] == ([[1], [1]] if index < 3 else [[], []])
        assert call["ranks_vision"][0] == call["ranks_vision"][1]
        if method == "visionzip" and index == 3:
            # It reads no text, so the image's key is the image alone: vLLM's encoder cache serves
            # the first question's selection again, and nothing selects.
            assert call["ranks_kept"] == [[], []]
            continue
        vllm_rows = recorded_rows(runs["selections"], method, index)
        reference = transformers_on_vllm_choice(hf_model, vllm_rows, request, BUDGET, method)
        if reference is None:  # VisionZip's merged tokens on a near-tie: the selection checks hold
            continue
        ((_, _, kept),) = call["ranks_kept"][0]
        assert [kept] == reference["kept"]
        assert_same_answer(call, reference)
