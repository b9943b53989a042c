"""The shipped demo model and the staged training pipeline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import flashvlm
from flashvlm.demo import MODEL_DIR
from flashvlm.demo.model import build_model, build_processor, multimodal_logits, pixel_tensor
from flashvlm.demo.scenes import GRID, split_example
from flashvlm.demo.train import STAGES, StageData, collate, make_config, stage_loss, train
from flashvlm.loading import chat_prompt


@pytest.fixture(scope="module")
def shipped():
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    return model, processor


@pytest.fixture(scope="module")
def scene_inputs(shipped):
    _, processor = shipped
    examples = [split_example(0, "validation", i) for i in range(2)]
    return processor(
        images=[e.render() for e in examples],
        text=[chat_prompt(processor, e.question) for e in examples],
        return_tensors="pt",
        padding=True,
    )


def test_shipped_folder_is_a_llava_with_processor(shipped):
    model, processor = shipped
    files = {path.name for path in MODEL_DIR.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= files
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 30 * 2**20
    assert model.config.vision_feature_layer == -2
    prompt = chat_prompt(processor, "what color is the circle ?")
    assert prompt == "USER: <image>\nwhat color is the circle ? ASSISTANT:"


def test_prune_runs_on_the_shipped_model(shipped, scene_inputs):
    model, _ = shipped
    with torch.no_grad(), flashvlm.prune(model, 28) as pruner:
        logits = model(**scene_inputs).logits
    assert logits.shape[0] == 2
    assert [image.num_kept for image in pruner.last.images] == [28, 28]
    assert pruner.last.images[0].grid_shape == (GRID, GRID)
    with torch.no_grad():
        full = model(**scene_inputs).logits  # a full forward after a pruned one still works
    assert full.shape[1] == scene_inputs["input_ids"].shape[1]


def test_training_forward_matches_the_model_forward(shipped, scene_inputs):
    model, _ = shipped
    inputs = scene_inputs
    with torch.no_grad():
        reference = model(**inputs).logits
        # The training path skips the last vision layer; it must not change anything.
        ours = multimodal_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_fast_pixels_match_the_processor():
    image = split_example(0, "test", 3).render()
    expected = build_processor()(images=[image], text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_tensor([image]), expected)


def test_every_stage_trains_and_resumes(tmp_path):
    config = make_config("smoke")
    train(config, tmp_path, stages=("lm",), device="cpu")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["completed"] == ["lm"]
    metrics = train(config, tmp_path, device="cpu")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["completed"] == list(STAGES)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    trained = [line["stage"] for line in log if "stage" in line]
    assert trained.count("lm") == 2 and all(stage in trained for stage in STAGES)  # lm not repeated on resume
    assert any("resumed" in line for line in log)
    assert set(metrics["validation"]) >= {"attribute", "existence", "counting", "relation", "overall"}
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert reloaded.config.text_config.hidden_size == config.size.text_width
    with torch.no_grad(), flashvlm.prune(reloaded, 0.25) as pruner:
        processor = AutoProcessor.from_pretrained(tmp_path / "model")
        example = split_example(0, "test", 0)
        reloaded(
            **processor(images=[example.render()], text=chat_prompt(processor, example.question), return_tensors="pt")
        )
    assert pruner.last.images[0].num_kept == 64


def test_resume_continues_inside_a_stage(tmp_path):
    config = make_config("smoke")
    two_steps = dataclasses.replace(config, lm=dataclasses.replace(config.lm, steps=2))
    four_steps = dataclasses.replace(config, lm=dataclasses.replace(config.lm, steps=4))
    train(two_steps, tmp_path, stages=("lm",), device="cpu")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    state["completed"] = []  # as if a 4-step stage had been interrupted after its checkpoint at step 2
    torch.save(state, tmp_path / "state.pt")
    train(four_steps, tmp_path, stages=("lm",), device="cpu")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert next(line for line in log if "resumed" in line)["step"] == 2
    assert [line["step"] for line in log if line.get("stage") == "lm"] == [1, 2, 3, 4]


def test_lm_stage_can_show_a_symbolic_grid():
    config = make_config("smoke")
    data = StageData("lm", 0, batch_size=2, grid_share=1.0)
    samples = [data[i] for i in range(2)]
    assert all(len(s["grid"]) == GRID * GRID for s in samples)
    assert any(any(cell != [0, 0, 0] for cell in s["grid"]) for s in samples)
    batch = collate(samples)
    model = build_model(config.size)
    loss, _ = stage_loss(model, "lm", batch, None)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0
