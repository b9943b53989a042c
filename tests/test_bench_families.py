"""The benchmark drives every family from its record: synthetic inputs, FLOPs, a pruned run."""

from __future__ import annotations

import json

import pytest
import torch

import flashvlm
from flashvlm.bench.families.llava_next_video import VIDEO_FRAMES
from flashvlm.bench.models import (
    SHIPPED_CONFIGS,
    build_model,
    family_of,
    load_config,
    prefill_flops,
    scale_config,
    synthetic_inputs,
)
from flashvlm.bench.prefill import language_model_of, vision_module
from flashvlm.cli import main

#: The smallest shape a family still runs at: one layer each side, 1/16 of every width.
SMALLEST = {"lm_layers": 1, "vision_layers": 1, "width": 0.0625}


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_synthetic_inputs_hold_one_image_per_row_and_flops_shrink_with_the_budget(name):
    config = load_config(name)
    inputs = synthetic_inputs(config, batch=2, text_tokens=40, seed=0)
    placeholders = (inputs.model_kwargs["input_ids"] == inputs.placeholder_token_id).sum(dim=1)
    assert placeholders.tolist() == [inputs.visual_tokens_per_image] * 2
    # Structural tokens count as text (SmolVLM's 40 row/column markers come on top of the 40 asked for).
    assert inputs.text_tokens >= 40
    assert inputs.model_kwargs["input_ids"].shape[1] == inputs.text_tokens + inputs.visual_tokens_per_image
    full = prefill_flops(config, 40, inputs.visual_tokens_per_image, inputs.visual_tokens_per_image, 2)
    pruned = prefill_flops(config, 40, inputs.visual_tokens_per_image, 64, 2)
    assert full.vision > 0 and pruned.language_model < full.language_model


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_synthetic_inputs_move_every_tensor_to_the_model_device(name):
    # The bench builds the model on its device; inputs left on the CPU fail the first
    # convolution of a GPU tower (seen on the first GPU run).
    inputs = synthetic_inputs(load_config(name), batch=1, text_tokens=20, seed=0)
    moved = inputs.to("meta")
    tensors = {key for key, value in inputs.model_kwargs.items() if torch.is_tensor(value)}
    assert tensors >= {"input_ids"} and moved.model_kwargs.keys() == inputs.model_kwargs.keys()
    assert all(moved.model_kwargs[key].device.type == "meta" for key in tensors)
    assert moved.visual_tokens_per_image == inputs.visual_tokens_per_image


def test_bench_hands_the_model_its_inputs_on_the_model_device(monkeypatch, tmp_path):
    from flashvlm.bench import models as bench_models

    moved_to = []
    original = bench_models.SyntheticInputs.to
    monkeypatch.setattr(
        bench_models.SyntheticInputs, "to", lambda self, device: moved_to.append(device) or original(self, device)
    )
    argv = "bench --model llava-1.5-7b --scale tiny --methods pool --budgets 16 --repeats 1 --warmup 0 --new-tokens 1"
    assert main(argv.split()) == 0
    assert moved_to == [torch.device("cpu")]


def test_records_give_the_width_of_the_features_a_method_compares():
    # The pixel shuffle puts 2 x 2 (InternVL) or 3 x 3 (SmolVLM2) patch features side by side.
    widths = {name: family_of(load_config(name)).feature_width(load_config(name)) for name in SHIPPED_CONFIGS}
    assert widths["internvl3-8b"] == 4 * 1024 and widths["smolvlm2-2.2b"] == 9 * 1152
    assert widths["llava-1.5-7b"] == widths["llava-next-video-7b"] == 1024


@pytest.mark.parametrize("name", ["qwen3-vl-8b", "gemma-3-4b"])
def test_a_new_family_prunes_at_its_real_token_count(name):
    config = scale_config(load_config(name), SMALLEST)
    model = build_model(config, torch.device("cpu"), torch.float32)
    assert vision_module(model) is flashvlm.adapter_for(model).vision_tower
    inputs = synthetic_inputs(config, batch=1, text_tokens=20, seed=0)
    seen = []
    hook = language_model_of(model).register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with flashvlm.prune(model, 32) as pruner, torch.no_grad():
            model(**inputs.model_kwargs)
    finally:
        hook.remove()
    assert pruner.last.images[0].num_tokens == inputs.visual_tokens_per_image
    assert seen == [20 + 32]


def test_onevision_inputs_hold_the_token_count_the_model_computes():
    # Base view, 2 x 2 crops and a newline per raster row: the model refuses a prompt whose
    # placeholders differ from the features its own unpadding and newline rule make.
    config = scale_config(load_config("llava-onevision-7b"), SMALLEST)
    model = build_model(config, torch.device("cpu"), torch.float32)
    inputs = synthetic_inputs(config, batch=1, text_tokens=20, seed=0)
    with flashvlm.prune(model, 32) as pruner, torch.no_grad():
        model(**inputs.model_kwargs)
    assert inputs.visual_tokens_per_image == 27 * 27 + 54 * 54 + 54
    assert pruner.last.images[0].num_tokens == 27 * 27 + 54 * 54  # newlines stay outside the budget


#: Configs of the tiled, split-image and video families, one CLI run each.
TILED_AND_VIDEO_CONFIGS = ["internvl3-8b", "internvl3.5-8b", "smolvlm2-2.2b", "llava-next-video-7b"]


@pytest.mark.parametrize("name", TILED_AND_VIDEO_CONFIGS)
def test_bench_runs_a_tiled_or_video_family_end_to_end(name, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", name, "--scale", "tiny", "--methods", "flashvlm", "--budgets", "32"]
    argv += ["--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--text-tokens", "8", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    unpruned, pruned = report["rows"]
    assert pruned["method"] == "flashvlm" and report["model"]["visual_layout"]
    visual, text = report["model"]["visual_tokens"], report["model"]["text_tokens"]
    # Every budget unit of the row counts: a video keeps 32 per frame.
    frames = VIDEO_FRAMES if name.startswith("llava-next-video") else 1
    assert pruned["kept_tokens"] == 32 * frames < visual == unpruned["kept_tokens"]
    assert unpruned["prompt_length"] == text + visual and pruned["prompt_length"] == text + 32 * frames
    assert 0 < pruned["flops_total"] < unpruned["flops_total"]
    assert min(pruned["flops_vision"], pruned["flops_projector"], pruned["flops_language_model"]) > 0
    assert pruned["ideal_prefill_speedup"] > 1
