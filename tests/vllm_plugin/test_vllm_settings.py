"""The switch's settings, the engine's and a request's own (no engine needed): methods, presets and
parameters as in the Python API."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flashvlm import FlashVLM
from flashvlm.errors import BudgetError, FlashVLMError, MethodUnavailableError, UnsupportedModelError
from flashvlm.integrations.vllm import RefuseUnservedArchitectures, unsupported_vllm
from flashvlm.integrations.vllm.settings import (
    DEFAULT_VISION_CACHE_MB,
    parse_settings,
    request_settings,
    settings_from_json,
    settings_of,
)


def test_method_defaults_to_flashvlm_and_takes_presets_and_parameters():
    assert parse_settings({"budget": 64}).selector == FlashVLM()
    assert parse_settings({"method": "flashvlm:release", "budget": 64}).selector == FlashVLM.preset("release")
    assert parse_settings({"method": "flashvlm", "budget": 0.25, "text_weight": 0.3}).selector.text_weight == 0.3


@pytest.mark.parametrize(
    "budget, num_tokens, expected", [(64, 256, 64), (300, 256, 256), (0.11, 256, 28), (1.0, 256, 256)]
)
def test_the_placeholder_count_is_the_resolved_budget(budget, num_tokens, expected):
    assert parse_settings({"budget": budget}).num_kept(num_tokens) == expected


def test_the_vision_cache_size_is_a_setting_apart_from_the_methods_parameters():
    assert parse_settings({"budget": 64}).vision_cache_mb == DEFAULT_VISION_CACHE_MB == 256
    settings = parse_settings({"method": "flashvlm", "budget": 64, "vision_cache_mb": 0, "text_weight": 0.3})
    assert (settings.vision_cache_mb, settings.selector.text_weight) == (0, 0.3)
    assert parse_settings({"budget": 64, "vision_cache_mb": 0.5}).vision_cache_mb == 0.5


def test_a_video_budget_counts_per_frame_by_default_or_for_the_whole_video():
    per_frame = parse_settings({"budget": 8})
    assert per_frame.video_budget == "per_frame"
    assert (per_frame.num_kept_per_frame(3, 64), per_frame.num_kept_in_video(3, 64)) == ([8, 8, 8], 24)
    per_video = parse_settings({"budget": 0.25, "video_budget": "per_video"})
    assert per_video.num_kept_in_video(3, 64) == 48  # a quarter of 192 tokens, however the frames share it
    with pytest.raises(FlashVLMError, match="no fixed count per frame"):
        per_video.num_kept_per_frame(3, 64)


def test_the_unpruned_method_keeps_every_placeholder():
    assert parse_settings({"method": "none", "budget": 8}).num_kept(256) == 256


@pytest.mark.parametrize(
    "settings, error, words",
    [
        ({"budget": 0}, BudgetError, "budget must be >= 1"),
        ({"method": "flashvlm"}, FlashVLMError, 'need a "budget"'),
        ({"method": "nosuch", "budget": 8}, FlashVLMError, "unknown method 'nosuch'"),
        ({"budget": 8, "nosuch": 1}, FlashVLMError, "has no parameter(s) ['nosuch']"),
        ({"method": "fastv", "budget": 8}, MethodUnavailableError, "needs lm_attention"),
        ({"method": "flashvlm:question", "budget": 8}, MethodUnavailableError, "text_tokens='question'"),
        ({"budget": 8, "text_tokens": "question"}, MethodUnavailableError, "does not hand the model"),
        (64, FlashVLMError, "must be a mapping"),
        ({"budget": 8, "vision_cache_mb": -1}, FlashVLMError, "vision_cache_mb must be a number of MiB >= 0"),
        ({"budget": 8, "vision_cache_mb": "256"}, FlashVLMError, "(0 turns the vision cache off); got '256'"),
        ({"budget": 8, "vision_cache_mb": True}, FlashVLMError, "vision_cache_mb must be a number"),
        (
            {"budget": 8, "video_budget": "per_clip"},
            FlashVLMError,
            "video_budget must be one of 'per_frame', 'per_video'; got 'per_clip'",
        ),
    ],
)
def test_bad_settings_name_the_override_and_the_bad_value(settings, error, words):
    class Config:
        flashvlm = settings

    with pytest.raises(error) as raised:
        settings_of(Config())
    message = str(raised.value)
    assert message.startswith('hf_overrides["flashvlm"]: ') and words in message


def test_no_key_means_stock_vllm():
    assert settings_of(object()) is None


@pytest.mark.parametrize(("version", "served"), [("0.32.0", True), ("0.33.1", True), ("0.34.0", False), ("1.0", False)])
def test_the_plugin_names_the_vllm_releases_it_serves(version, served):
    reason = unsupported_vllm(version)
    assert (reason is None) == served
    if not served:
        assert reason == f"flashvlm's vLLM plug-in serves vLLM 0.32.x, 0.33.x; this is vLLM {version}"


def test_an_unserved_vllm_release_refuses_only_the_switch():
    # register() on such a release wraps vLLM's architecture lookup with the reason.
    lookup = RefuseUnservedArchitectures(lambda architectures, config: ("info", architectures[0]), "why")
    stock = SimpleNamespace(hf_config=SimpleNamespace())
    assert lookup(["LlavaForConditionalGeneration"], stock) == ("info", "LlavaForConditionalGeneration")
    switched = SimpleNamespace(hf_config=SimpleNamespace(flashvlm={"budget": 64}))
    with pytest.raises(UnsupportedModelError, match=r'^hf_overrides\["flashvlm"\]: why$'):
        lookup(["LlavaForConditionalGeneration"], switched)


# -- a request's own settings (mm_processor_kwargs={"flashvlm": {...}}) -------------------------

ENGINE = {"method": "flashvlm", "budget": 64, "text_weight": 0.3}


def test_a_request_overrides_the_engines_keys_and_keeps_the_rest():
    text = request_settings(ENGINE, {"budget": 16})
    assert json.loads(text) == {"method": "flashvlm", "budget": 16, "text_weight": 0.3}
    settings = settings_from_json(text)
    assert (settings.budget, settings.selector.text_weight) == (16, 0.3)


def test_a_request_naming_another_method_keeps_only_the_engines_budget():
    text = request_settings(ENGINE, {"method": "visionzip"})
    assert json.loads(text) == {"method": "visionzip", "budget": 64}
    assert settings_from_json(text).selector.name == "visionzip"
    assert json.loads(request_settings(ENGINE, {"method": "flashvlm:release", "budget": 32})) == {
        "method": "flashvlm:release",
        "budget": 32,
    }
    # The video budget is the engine's too, not its method's.
    engine = {**ENGINE, "video_budget": "per_video"}
    assert json.loads(request_settings(engine, {"method": "pool"})) == {
        "method": "pool",
        "budget": 64,
        "video_budget": "per_video",
    }


def test_a_request_that_comes_to_the_engines_settings_is_the_engines():
    # None: no settings of its own, so it shares the engine's cache keys.
    assert request_settings(ENGINE, {"budget": 64}) is None
    assert request_settings(ENGINE, {}) is None


def test_a_request_of_an_engine_with_a_vision_cache_size_is_parsed_as_usual():
    engine = {**ENGINE, "vision_cache_mb": 0}
    assert request_settings(engine, {"budget": 64}) is None
    assert settings_from_json(request_settings(engine, {"budget": 16})).budget == 16


def test_equal_settings_give_the_same_key():
    assert request_settings(ENGINE, {"text_weight": 0.5, "budget": 8}) == request_settings(
        ENGINE, {"budget": 8, "text_weight": 0.5}
    )


@pytest.mark.parametrize(
    "settings, error, words",
    [
        ({"budget": 0}, BudgetError, "budget must be >= 1"),
        ({"method": "nosuch"}, FlashVLMError, "unknown method 'nosuch'"),
        ({"nosuch": 1}, FlashVLMError, "has no parameter(s) ['nosuch']"),
        ({"method": "fastv"}, MethodUnavailableError, "needs lm_attention"),
        ({"budget": object()}, FlashVLMError, "must be JSON values"),
        (32, FlashVLMError, "must be a mapping"),
        ({"vision_cache_mb": 0}, FlashVLMError, "vision_cache_mb is the engine's"),
        ({"video_budget": "all"}, FlashVLMError, "video_budget must be one of 'per_frame', 'per_video'; got 'all'"),
    ],
)
def test_bad_request_settings_name_the_request_and_the_bad_value(settings, error, words):
    with pytest.raises(error) as raised:
        request_settings(ENGINE, settings)
    message = str(raised.value)
    assert message.startswith('mm_processor_kwargs["flashvlm"]: ') and words in message and "\n" not in message


def test_a_request_cannot_switch_pruning_on_in_a_stock_engine():
    with pytest.raises(FlashVLMError, match=r"per-request settings need the engine started with hf_overrides"):
        request_settings(None, {"budget": 16})


def test_a_family_without_a_cls_row_refuses_a_request_method_that_reads_one():
    from flashvlm.integrations.vllm.qwen_vl import QWEN_SERVED_REQUIREMENTS

    with pytest.raises(MethodUnavailableError, match="needs cls_attention"):
        request_settings(ENGINE, {"method": "vispruner"}, QWEN_SERVED_REQUIREMENTS)


@pytest.mark.parametrize("kind", ["image_embeds", "video_embeds"])
def test_precomputed_embeddings_are_refused_in_one_line(kind):
    from flashvlm.integrations.vllm.pruned_model import require_pixels

    for pixels in ("pixel_values", "pixel_values_videos"):
        require_pixels({"type": pixels})
    with pytest.raises(FlashVLMError) as refused:
        require_pixels({"type": kind})
    assert str(refused.value) == f"flashvlm selects from pixels; precomputed {kind} carry no encoder saliency"
