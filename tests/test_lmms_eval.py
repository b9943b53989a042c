"""lmms-eval itself, running flashvlm's model on a local JSONL task (no download).

Skipped unless lmms-eval is installed (``make test`` installs it and runs these).
The reference for every number lmms-eval reports is a direct computation with flashvlm
on the same rows: one row at a time, the model's chat format around the question,
greedy generation, :func:`flashvlm.eval.score_answer`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make eval-setup installs it)")
pytestmark = pytest.mark.lmms_eval

from families.llava import NUM_PATCHES  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from PIL import Image  # noqa: E402

import flashvlm  # noqa: E402
from flashvlm.errors import FlashVLMError  # noqa: E402
from flashvlm.eval import load_dataset, normalize_answer, score_answer  # noqa: E402
from flashvlm.integrations.lmms_eval import MODEL_ID, register  # noqa: E402
from flashvlm.integrations.lmms_eval.jsonl_task import write_task  # noqa: E402
from flashvlm.integrations.lmms_eval.model import PrunedVLM  # noqa: E402
from flashvlm.loading import chat_prompt, load_image, load_model  # noqa: E402

MAX_NEW_TOKENS = 4
TASK = "flashvlm_tiny_vqa"
BUDGETS = (16, 4)
FAMILIES = ("attribute", "count")


def flashvlm_entry_point_installed() -> bool:
    return any(ep.name == MODEL_ID for ep in entry_points(group="lmms_eval.models"))


@pytest.fixture(scope="module", autouse=True)
def flashvlm_model_registered():
    """The entry point registers the model when flashvlm is installed; a bare source checkout registers it here."""
    if not flashvlm_entry_point_installed():
        register()


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def direct_answers(model, processor, rows, budget) -> list[str]:
    """What flashvlm answers to each row, one row at a time, greedily."""
    answers = []
    for row in rows:
        prompt = chat_prompt(processor, row.question, 1)
        inputs = processor(images=[load_image(image) for image in row.images], text=prompt, return_tensors="pt")
        with flashvlm.prune(model, budget, "flashvlm"), torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def tiny_vqa(tiny_llava_folder, tmp_path_factory):
    """A JSONL dataset of 8 rows whose answers make both budgets score between 0 and 1.

    Even rows take as answer what the model says at the first budget, odd rows what it
    says at the second: so each budget gets at least half right, and exactly half plus
    the rows where the two budgets agree.
    """
    folder = tmp_path_factory.mktemp("tiny-vqa")
    (folder / "images").mkdir()
    generator = torch.Generator().manual_seed(1)
    questions = ["what is the color of the circle ?", "how many square ?", "is the triangle red ?"]
    records = []
    for index in range(8):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        records.append(
            {
                "id": f"q{index}",
                "image": f"images/{index}.png",
                "question": questions[index % 3],
                "answer": "?",
                "family": FAMILIES[index // 2 % 2],
            }
        )
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    model, processor = load_model(str(tiny_llava_folder), device="cpu")
    rows = load_dataset(path, on_bad_row="stop").examples
    first, second = (direct_answers(model, processor, rows, budget) for budget in BUDGETS)
    for index, record in enumerate(records):
        record["answer"] = (first if index % 2 == 0 else second)[index]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    tasks = write_task(path, folder / "tasks", TASK, max_new_tokens=MAX_NEW_TOKENS).parent
    return dict(
        path=path, tasks=tasks, rows=load_dataset(path, on_bad_row="stop").examples, model=model, processor=processor
    )


def test_the_entry_point_registers_flashvlm_with_lmms_eval():
    if not flashvlm_entry_point_installed():
        pytest.skip("flashvlm is on PYTHONPATH but not pip-installed, so its entry points are not visible")
    assert get_model(MODEL_ID) is PrunedVLM


@pytest.mark.parametrize("budget", BUDGETS)
def test_lmms_eval_accuracy_equals_direct_flashvlm_and_records_what_was_kept(tiny_llava_folder, tiny_vqa, budget):
    rows, processor = tiny_vqa["rows"], tiny_vqa["processor"]
    predictions = direct_answers(tiny_vqa["model"], processor, rows, budget)
    scores = [float(score_answer(prediction, row.answer)) for prediction, row in zip(predictions, rows)]
    assert sum(scores) / len(scores) >= 0.5  # by construction of the answers

    results = simple_evaluate(
        model=MODEL_ID,
        model_args=f"pretrained={tiny_llava_folder},method=flashvlm,budget={budget},device=cpu",
        tasks=[TASK],
        batch_size=3,  # 8 rows: batches of 3, 3 and 2, left-padded
        task_manager=TaskManager(include_path=str(tiny_vqa["tasks"]), include_defaults=False),
        bootstrap_iters=0,
    )

    reported = results["results"][TASK]
    assert reported["exact_match,none"] == pytest.approx(sum(scores) / len(scores))
    for family in FAMILIES:
        family_scores = [score for score, row in zip(scores, rows) if row.family == family]
        assert reported[f"exact_match_{family},none"] == pytest.approx(sum(family_scores) / len(family_scores))
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert [sample["filtered_resps"][0] for sample in samples] == predictions

    assert f"method=flashvlm,budget={budget}" in results["config"]["model_args"]
    assert results["throughput"]["avg_visual_tokens_kept_per_image"] == budget
    assert results["throughput"]["avg_visual_tokens_per_image"] == NUM_PATCHES
    for sample, row in zip(samples, rows):
        text_tokens = (
            len(
                processor(images=[load_image(row.images[0])], text=chat_prompt(processor, row.question, 1))[
                    "input_ids"
                ][0]
            )
            - NUM_PATCHES
        )
        assert sample["token_counts"][0]["input_tokens"] == text_tokens + budget


def test_demo_benchmark_lmms_eval_equals_flashvlm_compare(tmp_path):
    """lmms-eval on the demo benchmark's test split, with the demo model, at two budgets,
    reports the accuracies ``flashvlm compare`` reports on the same rows."""
    import csv

    from scene_llava import FOLDER as SCENE_LLAVA

    from flashvlm.cli import main as flashvlm_main
    from lab.splits import export_split

    data = export_split("test", tmp_path / "data", size=12)
    tasks = write_task(data, tmp_path / "tasks", "demo_test", max_new_tokens=MAX_NEW_TOKENS).parent
    budgets = (28, 14)  # 11 % and 5.6 % of the demo model's 256 tokens
    out = tmp_path / "compare"
    assert flashvlm_main([
        "compare", "--model", str(SCENE_LLAVA), "--device", "cpu", "--data", str(data), "--methods", "flashvlm",
        "--budgets", ",".join(map(str, budgets)), "--batch-size", "4", "--out", str(out), "--no-progress",
        "--prompt-suffix", "", "--max-new-tokens", str(MAX_NEW_TOKENS),
    ]) == 0  # fmt: skip
    with (out / "compare.csv").open() as file:
        compared = {
            row["budget"]: float(row["accuracy"]) for row in csv.DictReader(file) if row["method"] == "flashvlm"
        }
    for budget in budgets:
        results = simple_evaluate(
            model=MODEL_ID,
            model_args=f"pretrained={SCENE_LLAVA},method=flashvlm,budget={budget},device=cpu",
            tasks=["demo_test"],
            batch_size=4,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            bootstrap_iters=0,
        )
        assert results["results"]["demo_test"]["exact_match,none"] == pytest.approx(compared[str(budget)], abs=1e-4)
        assert results["throughput"]["avg_visual_tokens_kept_per_image"] == budget


def test_lmms_eval_command_line_with_the_entry_point(tiny_llava_folder, tiny_vqa, tmp_path):
    if not flashvlm_entry_point_installed():
        pytest.skip(
            "the lmms-eval command finds flashvlm through its entry point: pip-install flashvlm (make test does)"
        )
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "flashvlm",
        "--model_args",
        f"pretrained={tiny_llava_folder},method=flashvlm,budget=25%,device=cpu",
        "--tasks",
        TASK,
        "--include_path",
        str(tiny_vqa["tasks"]),
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "flashvlm"
    assert "method=flashvlm,budget=25%" in results["config"]["model_args"]
    assert results["throughput"]["avg_visual_tokens_kept_per_image"] == NUM_PATCHES // 4
    assert 0.0 <= results["results"][TASK]["exact_match,none"] <= 1.0


def requests_for(docs: dict[int, dict], gen_kwargs: dict) -> list[Instance]:
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), lambda d: d["visuals"], doc_id, "task", "test"),
            idx=0,
            metadata={"task": "task", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in docs.items()
    ]


@pytest.fixture(scope="module")
def pruned_vlm(tiny_llava_folder):
    return PrunedVLM(pretrained=str(tiny_llava_folder), method="flashvlm", budget=8, device="cpu", batch_size=3)


def test_a_batch_may_mix_text_only_and_image_rows(pruned_vlm, sample_image_file):
    image = load_image(sample_image_file)
    docs = {
        0: {"question": "how many ?", "visuals": []},
        1: {"question": "what is the shape ?", "visuals": [image]},
        2: {"question": "is it red ?", "visuals": [image, image]},
    }
    pruned_vlm.task_dict = {"task": {"test": docs}}
    outputs = pruned_vlm.generate_until(requests_for(docs, {"max_new_tokens": 3, "until": ["\n\n"]}))
    assert len(outputs) == 3
    assert all(isinstance(output.text, str) for output in outputs)
    prompt_lengths = [
        len(
            pruned_vlm.processor(
                images=doc["visuals"] or None,
                text=chat_prompt(pruned_vlm.processor, doc["question"], len(doc["visuals"])),
            )["input_ids"][0]
        )
        for doc in docs.values()
    ]
    # Each image's 64 placeholders become 8 kept tokens; the text-only row is unchanged.
    expected = [length - len(doc["visuals"]) * (NUM_PATCHES - 8) for length, doc in zip(prompt_lengths, docs.values())]
    assert [output.token_counts.input_tokens for output in outputs] == expected


def test_a_question_guided_method_finds_each_context(tiny_llava_folder, sample_image_file):
    vlm = PrunedVLM(pretrained=str(tiny_llava_folder), method="flashvlm:question", budget=8, device="cpu")
    docs = {0: {"question": "what is the color ?", "visuals": [load_image(sample_image_file)]}}
    vlm.task_dict = {"task": {"test": docs}}
    (output,) = vlm.generate_until(requests_for(docs, {"max_new_tokens": 2}))
    assert isinstance(output.text, str)
    request = Instance(
        request_type="loglikelihood",
        arguments=("what is the color ?", "red", lambda d: d["visuals"], 0, "task", "test"),
        idx=0,
        metadata={"task": "task", "doc_id": 0, "repeats": 1},
    )
    ((log_probability, _),) = vlm.loglikelihood([request])
    assert log_probability < 0


def test_stop_strings_cut_the_answer(pruned_vlm, sample_image_file):
    docs = {0: {"question": "what is the color ?", "visuals": [load_image(sample_image_file)]}}
    pruned_vlm.task_dict = {"task": {"test": docs}}
    (full,) = pruned_vlm.generate_until(requests_for(docs, {"max_new_tokens": 4, "until": []}))
    words = full.text.split()
    assert len(words) >= 2
    (cut,) = pruned_vlm.generate_until(requests_for(docs, {"max_new_tokens": 4, "until": [" " + words[1]]}))
    assert cut.text == words[0]


def test_video_inputs_are_refused_clearly(pruned_vlm):
    docs = {0: {"question": "what happens ?", "visuals": ["clip.mp4"]}}
    pruned_vlm.task_dict = {"task": {"test": docs}}
    with pytest.raises(FlashVLMError, match="takes image tasks; got a str visual"):
        pruned_vlm.generate_until(requests_for(docs, {"max_new_tokens": 2}))


def test_visuals_are_converted_like_image_files(pruned_vlm):
    # A float visual in 0..1 (as datasets decode some) must not be clipped to black by Pillow's convert.
    ramp = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    (image,) = pruned_vlm._images(lambda doc: doc["visuals"], {"visuals": [Image.fromarray(ramp)]})
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.round(ramp * 255).astype(np.uint8))


def test_loglikelihood_keeping_every_token_equals_the_unpruned_model(tiny_llava_folder, sample_image_file):
    full = PrunedVLM(pretrained=str(tiny_llava_folder), method="flashvlm", budget=1.0, device="cpu")
    image = load_image(sample_image_file)
    docs = {0: {"question": "what is the color ?", "visuals": [image]}}
    full.task_dict = {"task": {"test": docs}}
    request = Instance(
        request_type="loglikelihood",
        arguments=("what is the color ?", " red", lambda d: d["visuals"], 0, "task", "test"),
        idx=0,
        metadata={"task": "task", "doc_id": 0, "repeats": 1},
    )
    ((log_probability, greedy),) = full.loglikelihood([request])

    processor = full.processor
    inputs = processor(
        images=[image], text=chat_prompt(processor, "what is the color ?", 1) + " red", return_tensors="pt"
    )
    with torch.no_grad():
        logits = full.model(**inputs).logits
    target = processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
    expected = logits[0, -len(target) - 1 : -1].log_softmax(-1)[range(len(target)), target].sum()
    assert log_probability == pytest.approx(float(expected), abs=1e-4)
    assert isinstance(greedy, bool)


@pytest.mark.parametrize(
    "model_args,message",
    [
        (dict(budget=8), "needs method= and budget="),
        (dict(method="flashvlm"), "needs method= and budget="),
        (dict(method="magic", budget=8), "unknown method 'magic'"),
        (dict(method="flashvlm", budget=0), "budget must be >= 1"),
        (dict(method="flashvlm", budget="many"), "'many'"),
        (dict(method="flashvlm", budget=8, colour="red"), "has no parameter(s) ['colour']"),
        (dict(method="flashvlm:nonsense", budget=8), "has no preset 'nonsense'"),
        (dict(method="flashvlm", budget=8, batch_size="auto"), "batch_size must be an integer >= 1; got 'auto'"),
    ],
)
def test_bad_model_args_are_refused_before_loading(model_args, message):
    with pytest.raises(FlashVLMError) as error:
        PrunedVLM(pretrained="/nonexistent/model", **model_args)
    assert message in str(error.value)


def test_method_parameters_and_presets_pass_through(tiny_llava_folder):
    model = PrunedVLM(pretrained=str(tiny_llava_folder), method="flashvlm", budget="25%", text_weight=0.3, device="cpu")
    assert model.selector.text_weight == 0.3 and model.budget == 0.25


def test_scoring_matches_lmms_eval_vqa_normalisation():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor = EvalAIAnswerProcessor()
    for text in [
        "The Red.",
        "two",
        "black-white",
        "1,000 ",
        "yes!",
        "a dog",
        "1.5",
        "left of the cat?",
        "Unanswerable",
        "3 (three)",
        "x = y + z",
        "it's @home",
        "none",
        "e.g. this",
        "dont know",
        "t-shirt",
    ]:
        theirs = processor.process_digit_article(processor.process_punctuation(" ".join(text.split())))
        assert normalize_answer(text) == theirs, text
