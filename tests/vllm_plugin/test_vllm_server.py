"""``vllm serve`` with the plug-in, on loopback: bad settings stop the server at start-up with one
clear line; an OpenAI chat request with a base64 image, at the engine's budget or at one of its
own (``mm_processor_kwargs``), answers as transformers + flashvlm does, for LLaVA-1.5 and
Qwen2.5-VL; a base64 MP4 video's placeholders follow a request's budget and video budget;
bad settings in a request get a 400 with one line, and the server goes on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from agreement import kept_under_perturbation
from scene_llava import FOLDER as SCENE_LLAVA
from tiny_qwen import EOS_ID as QWEN_EOS_ID
from tiny_qwen import QUESTIONS, image_files, prompt
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers_reference import transformers_reference, without_eos
from vllm_harness import post_json, start_server, stop, wait_until_ready

from flashvlm import get_method
from flashvlm.demo import EXAMPLES_DIR
from flashvlm.loading import chat_prompt

BUDGET = 28  # the LLaVA server's
LLAVA_REQUEST_BUDGET = 16  # a LLaVA request's own
QWEN_BUDGET = 24  # the Qwen server's
QWEN_REQUEST_BUDGET = 8  # a Qwen request's own
MAX_TOKENS = 6
LLAVA_EOS_ID = 2
#: log-probabilities of vLLM (its own kernels) and transformers agree this closely in float32.
LOGPROB_TOLERANCE = 2e-3
#: Relative perturbation of the vision inputs under which the Qwen reference must keep the same
#: tokens: a kept set on no near-tie at 10x the kernels' differences (about 1e-6), so the
#: server, whose selections cannot be read, keeps it too (tests/agreement.py). (The scene
#: LLaVA's FlashVLM selections move at 1e-6 already: its answers, not its tokens' exact
#: log-probabilities, are compared.)
NEAR_TIE_SCALE = 1e-5
#: Bounds on every wait: start-up (imports vLLM, builds the engine) and a refused start.
READY_SECONDS = 600
REFUSAL_SECONDS = 600


def first_example() -> dict:
    row = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]
    return {"image": EXAMPLES_DIR / row["image"], "question": row["question"]}


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


@pytest.fixture(scope="module")
def servers(demo_vllm_folder, tiny_qwen_vllm, tmp_path_factory):
    """The scene LLaVA and the tiny Qwen2.5-VL served side by side: {name: base URL}."""
    workdir = tmp_path_factory.mktemp("servers")
    # vLLM's server takes mm_processor_kwargs from a request only with --trust-request-mm-kwargs.
    trusted = ("--trust-request-mm-kwargs",)
    one_each = ("--limit-mm-per-prompt", json.dumps({"image": 1, "video": 1}))
    started = {
        "llava": start_server(demo_vllm_folder, {"flashvlm": {"budget": BUDGET}}, workdir / "llava", trusted),
        "qwen": start_server(
            tiny_qwen_vllm["folder"], {"flashvlm": {"budget": QWEN_BUDGET}}, workdir / "qwen", trusted + one_each
        ),
    }
    try:
        for process, base_url, log_path in started.values():
            assert wait_until_ready(process, base_url, READY_SECONDS), log_path.read_text()[-4000:]
        yield {name: base_url for name, (_, base_url, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            stop(process)


def chat(base_url: str, image: Path, question: str, settings: dict | None = None) -> tuple[int, dict]:
    """One OpenAI chat request with a base64 PNG (or MP4, by its suffix) and settings of its own:
    (HTTP status, body)."""
    encoded = base64.b64encode(Path(image).read_bytes()).decode()
    if Path(image).suffix == ".mp4":
        media = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{encoded}"}}
    else:
        media = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
    content = [media, {"type": "text", "text": question}]
    payload = {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "return_token_ids": True,
    }
    if settings is not None:
        payload["mm_processor_kwargs"] = {"flashvlm": settings}
    return post_json(f"{base_url}/v1/chat/completions", payload)


@pytest.fixture(scope="module")
def scene_llava():
    return LlavaForConditionalGeneration.from_pretrained(SCENE_LLAVA).eval(), AutoProcessor.from_pretrained(SCENE_LLAVA)


@pytest.mark.parametrize("budget", [BUDGET, LLAVA_REQUEST_BUDGET], ids=["engine budget", "request budget"])
def test_a_llava_chat_request_answers_as_transformers(servers, scene_llava, budget):
    example = first_example()
    settings = None if budget == BUDGET else {"budget": budget}
    status, reply = chat(servers["llava"], example["image"], example["question"], settings)
    assert status == 200, reply
    # vLLM's chat path tokenizes the rendered template without special tokens, and the demo's
    # template writes no BOS, so neither does the reference.
    model, processor = scene_llava
    request = {"prompt": chat_prompt(processor, example["question"]), "images": [example["image"]]}
    options = dict(max_tokens=MAX_TOKENS, eos_id=LLAVA_EOS_ID, add_special_tokens=False)
    reference = transformers_reference(model, processor, request, budget, **options)
    answer = processor.decode(reference["output_ids"], skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"].strip() == answer.strip()
    assert reply["usage"]["prompt_tokens"] == reference["prompt_length"]  # text + K, not text + N


def test_a_qwen_chat_request_at_a_budget_of_its_own_answers_as_transformers(servers, tiny_qwen_vllm, tmp_path):
    image = image_files(tmp_path)[1]  # 40 x 24 pixels: 6 x 10 merged tokens
    status, reply = chat(servers["qwen"], image, QUESTIONS[1], {"budget": QWEN_REQUEST_BUDGET})
    assert status == 200, reply
    # The chat template writes what prompt() writes; the chat path adds no BOS.
    request = {"prompt": prompt(QUESTIONS[1]), "images": [image]}
    model, processor = tiny_qwen_vllm["model"], tiny_qwen_vllm["processor"]
    options = dict(max_tokens=MAX_TOKENS, eos_id=QWEN_EOS_ID, add_special_tokens=False)
    reference = transformers_reference(model, processor, request, QWEN_REQUEST_BUDGET, **options)
    assert len(reference["kept"][0]) == QWEN_REQUEST_BUDGET
    # The server does not report its selection: the reference's is on no near-tie.
    for row in reference["rows"]:
        assert kept_under_perturbation(row, get_method("flashvlm"), NEAR_TIE_SCALE), "the example sits on a near-tie"
    (choice,) = reply["choices"]
    output_ids = without_eos(choice["token_ids"], QWEN_EOS_ID)
    assert output_ids == reference["output_ids"]
    logprobs = [step["logprob"] for step in choice["logprobs"]["content"]][: len(output_ids)]
    np.testing.assert_allclose(logprobs, reference["logprobs"], atol=LOGPROB_TOLERANCE)
    assert choice["message"]["content"].strip() == processor.decode(output_ids, skip_special_tokens=True).strip()
    assert reply["usage"]["prompt_tokens"] == reference["prompt_length"]  # text + K, not text + N


def mp4_file(folder: Path, num_frames: int = 8) -> Path:
    """``num_frames`` random 32 x 32 frames at 2 frames per second, as an MP4 (vLLM decodes it
    with OpenCV, as the server's video loader does): 8 x 8 merged tokens per temporal slice."""
    import cv2

    path = folder / "video.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (32, 32))
    for frame in np.random.default_rng(1).integers(0, 256, (num_frames, 32, 32, 3), dtype=np.uint8):
        writer.write(frame)
    writer.release()
    return path


def test_a_qwen_chat_video_takes_the_placeholders_of_its_requests_video_budget(servers, tmp_path):
    # The server reports no selection; its prompt length says how many slots each setting gave.
    video, per_slice = mp4_file(tmp_path), 64
    lengths = {}
    for name, settings in {
        "all": {"budget": 1.0},
        "per frame": {"budget": 4},
        "per video": {"budget": 12, "video_budget": "per_video"},
    }.items():
        status, reply = chat(servers["qwen"], video, QUESTIONS[0], settings)
        assert status == 200, f"{name}: {status} {reply}"
        lengths[name] = reply["usage"]["prompt_tokens"]
    video_tokens = lengths["all"] - lengths["per video"] + 12  # N: text + N against text + 12
    slices, rest = divmod(video_tokens, per_slice)
    assert rest == 0 and slices >= 1, video_tokens
    assert lengths["all"] - lengths["per frame"] == video_tokens - 4 * slices  # 4 in each temporal slice


BAD_REQUEST_SETTINGS = {
    "budget 0": ({"budget": 0}, "budget must be >= 1"),
    "unknown method": ({"method": "nosuch"}, "unknown method 'nosuch'"),
    "unknown parameter": ({"nosuch": 1}, "has no parameter(s) ['nosuch']"),
    "unservable method": ({"method": "fastv"}, "method 'fastv' needs lm_attention"),
    "no CLS row on Qwen": ({"method": "visionzip"}, "needs cls_attention"),
    "unknown video budget": (
        {"video_budget": "per_clip"},
        "video_budget must be one of 'per_frame', 'per_video'; got 'per_clip'",
    ),
}


def test_bad_request_settings_get_a_400_with_one_line_and_the_server_goes_on(servers, tmp_path):
    image = image_files(tmp_path)[0]
    for name, (settings, words) in BAD_REQUEST_SETTINGS.items():
        status, reply = chat(servers["qwen"], image, QUESTIONS[0], settings)
        message = reply["error"]["message"]
        assert status == 400, f"{name}: {status} {reply}"
        assert message.startswith('mm_processor_kwargs["flashvlm"]: ') and "\n" not in message, message
        assert words in message, message
    status, reply = chat(servers["qwen"], image, QUESTIONS[0])
    assert status == 200, reply


@pytest.fixture(scope="module", autouse=True)
def _no_proxy():
    # Loopback only: never send the test's requests through a configured proxy.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NO_PROXY", "127.0.0.1")
        yield
