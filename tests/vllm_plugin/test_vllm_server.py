"""``vllm serve`` with the plug-in, on loopback: a chat request with a base64 image answers as
the offline path does, and bad settings stop the server at start-up with one clear line."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from PIL import Image
from scene_llava import FOLDER as SCENE_LLAVA
from transformers import AutoProcessor, LlavaForConditionalGeneration
from vllm_harness import post_json, start_server, stop, wait_until_ready

import flashvlm
from flashvlm.demo import EXAMPLES_DIR
from flashvlm.loading import chat_prompt

BUDGET = 28
MAX_TOKENS = 6
#: Bounds on every wait: start-up (imports vLLM, builds the engine) and a refused start.
READY_SECONDS = 600
REFUSAL_SECONDS = 600


def first_example() -> dict:
    row = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]
    return {"image": EXAMPLES_DIR / row["image"], "question": row["question"]}


def offline_answer(example: dict) -> tuple[str, int]:
    """The answer and prompt length the offline path gives (it equals transformers + flashvlm:
    test_vllm_llava checks that), computed here with transformers + flashvlm.

    vLLM's chat path tokenizes the rendered chat template without adding special tokens,
    and the demo's template writes no BOS, so neither does the reference.
    """
    model = LlavaForConditionalGeneration.from_pretrained(SCENE_LLAVA).eval()
    processor = AutoProcessor.from_pretrained(SCENE_LLAVA)
    image = Image.open(example["image"]).convert("RGB")
    inputs = processor(
        images=image, text=chat_prompt(processor, example["question"]), return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad(), flashvlm.prune(model, budget=BUDGET) as pruner:
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True), pruner.last.pruned_length


def test_a_chat_request_with_a_base64_image_answers_as_offline(demo_vllm_folder, tmp_path):
    example = first_example()
    process, base_url, log_path = start_server(demo_vllm_folder, {"flashvlm": {"budget": BUDGET}}, tmp_path)
    try:
        assert wait_until_ready(process, base_url, READY_SECONDS), log_path.read_text()[-4000:]
        encoded = base64.b64encode(example["image"].read_bytes()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
            {"type": "text", "text": example["question"]},
        ]
        reply = post_json(
            f"{base_url}/v1/chat/completions",
            {
                "model": str(demo_vllm_folder),
                "messages": [{"role": "user", "content": content}],
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
            },
        )
    finally:
        stop(process)
    answer, prompt_length = offline_answer(example)
    assert reply["choices"][0]["message"]["content"].strip() == answer.strip()
    assert reply["usage"]["prompt_tokens"] == prompt_length  # text + K, not text + N


BAD_SETTINGS = {
    "budget 0": ({"budget": 0}, "budget must be >= 1"),
    "unknown method": ({"method": "nosuch", "budget": 28}, "unknown method 'nosuch'"),
    "unservable method": ({"method": "fastv", "budget": 28}, "method 'fastv' needs lm_attention"),
}


def test_bad_settings_stop_the_server_at_start_up_with_one_clear_line(demo_vllm_folder, tmp_path):
    # All three start at once: each fails in the front end, before an engine is built.
    servers = {
        name: start_server(demo_vllm_folder, {"flashvlm": settings}, tmp_path / name.replace(" ", "-"))
        for name, (settings, _) in BAD_SETTINGS.items()
    }
    try:
        for name, (process, base_url, _) in servers.items():
            ready = wait_until_ready(process, base_url, REFUSAL_SECONDS)
            assert not ready and process.poll() not in (None, 0), f"{name}: the server did not refuse to start"
    finally:
        for process, _, _ in servers.values():
            stop(process)
    for name, (_, _, log_path) in servers.items():
        last_line = log_path.read_text().strip().splitlines()[-1]
        expected = BAD_SETTINGS[name][1]
        assert last_line.startswith("flashvlm.errors.") and 'hf_overrides["flashvlm"]: ' in last_line, last_line
        assert expected in last_line, last_line


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # Loopback only: never send the test's requests through a configured proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
