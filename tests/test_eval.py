"""The evaluation package and ``flashvlm compare``: datasets, scoring, batched runs, reports."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

import pytest
import torch
from agreement import SWAPS, SelectionRecorder, check_same_selection, match_rows
from PIL import Image

import flashvlm
import flashvlm.eval.answers
from flashvlm.cli import main
from flashvlm.errors import FlashVLMError
from flashvlm.eval import DatasetError, answer_questions, load_dataset, normalize_answer, score_answer
from flashvlm.loading import load_model

GOOD_ROWS = [
    {
        "id": "a",
        "image": "img/0.png",
        "question": "what is the color of the circle ?",
        "answer": "red",
        "family": "colour",
    },
    {
        "id": "b",
        "image": "img/1.png",
        "question": "how many shape ?",
        "answer": "two",
        "family": "count",
        "source": "x",
    },
    {"id": "c", "image": ["img/0.png", "img/1.png"], "question": "is the square red ?", "answer": "yes"},
]
BAD_LINES = [
    '{"id": "d", "image": "img/missing.png", "question": "q", "answer": "a"}',  # missing image
    "{not json",  # bad JSON
    '{"id": "e", "image": "img/0.png", "question": "q"}',  # missing field
    '{"id": "a", "image": "img/0.png", "question": "q", "answer": "a"}',  # repeated id
    '{"id": "f", "image": "img/broken.png", "question": "q", "answer": "a"}',  # unreadable image
]


@pytest.fixture
def dataset_file(tmp_path):
    """A JSONL of three good rows (one with two images) followed by five malformed ones."""
    (tmp_path / "img").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "img" / f"{index}.png")
    (tmp_path / "img" / "broken.png").write_text("not an image")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(row) for row in GOOD_ROWS] + [""] + BAD_LINES) + "\n")
    return path


# -- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "correct"),
    [
        ("Two.", "2", True),
        ("The red circle!", "red circle", True),
        ("  YES ", "yes", True),
        ("3.", "3", True),
        ("1.5", "15", False),
        ("t-shirt", "t shirt", True),
        ("dont know", "don't know", True),
        ("blue", "red", False),
    ],
)
def test_vqa_scoring_normalises_like_lmms_eval(prediction, answer, correct):
    assert score_answer(prediction, answer) is correct


def test_other_scoring_rules():
    assert normalize_answer("An Apple, please?") == "apple please"
    assert score_answer("There are two circles.", "2", "contains")
    assert not score_answer("There are 12 circles.", "2", "contains")
    assert not score_answer("Red", "red", "exact")


# -- datasets -------------------------------------------------------------------------------


def test_load_dataset_keeps_good_rows_and_reports_bad_ones_by_line(dataset_file):
    dataset = load_dataset(dataset_file)
    assert [example.id for example in dataset.examples] == ["a", "b", "c"]
    assert dataset.examples[0].images == [dataset_file.parent / "img" / "0.png"]
    assert len(dataset.examples[2].images) == 2 and dataset.examples[2].family is None
    assert dataset.examples[1].extra == {"source": "x"}
    reasons = {bad.line: bad.reason for bad in dataset.bad_rows}
    assert sorted(reasons) == [5, 6, 7, 8, 9]  # line 4 is blank
    assert "image file not found" in reasons[5]
    assert "not valid JSON" in reasons[6]
    assert "missing field 'answer'" in reasons[7]
    assert "repeats the row on line 1" in reasons[8]
    assert "not a readable image" in reasons[9]


def test_load_dataset_can_stop_at_the_first_bad_row(dataset_file):
    with pytest.raises(DatasetError, match=r"data.jsonl line 5: image file not found"):
        load_dataset(dataset_file, on_bad_row="stop")
    with pytest.raises(FlashVLMError, match="on_bad_row must be one of skip, stop"):
        load_dataset(dataset_file, on_bad_row="ignore")
    with pytest.raises(FileNotFoundError):
        load_dataset(dataset_file.parent / "absent.jsonl")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_row_with_a_json_nan_or_infinity_is_malformed(dataset_file, constant):
    # json.loads accepts these non-standard constants; as an answer or id they would be scored as "nan"/"inf".
    with dataset_file.open("a") as rows:
        rows.write(f'{{"id": "g", "image": "img/0.png", "question": "q", "answer": {constant}}}\n')
        rows.write(f'{{"id": {constant}, "image": "img/0.png", "question": "q", "answer": "a"}}\n')
    dataset = load_dataset(dataset_file)
    assert [example.id for example in dataset.examples] == ["a", "b", "c"]
    reasons = {bad.line: bad.reason for bad in dataset.bad_rows}
    assert reasons[10] == reasons[11] == f"not valid JSON ({constant} is not a JSON number)"


def test_a_question_with_image_placeholders_for_other_images_is_malformed(dataset_file):
    # It reached the processor mid-run, whose ValueError ended compare with a traceback.
    with dataset_file.open("a") as rows:
        rows.write('{"id": "g", "image": "img/0.png", "question": "<image> or <image> ?", "answer": "a"}\n')
        rows.write(
            '{"id": "h", "image": ["img/0.png", "img/1.png"], "question": "<image> or <image> ?", "answer": "a"}\n'
        )
    dataset = load_dataset(dataset_file)
    assert [example.id for example in dataset.examples] == ["a", "b", "c", "h"]
    assert {bad.line: bad.reason for bad in dataset.bad_rows}[10] == (
        "field 'question' has 2 <image> placeholders for 1 image(s); "
        "write one <image> per image, or none to have the images placed before the question"
    )


def test_a_prompt_the_chat_template_cannot_take_is_named_by_dataset_line_and_id(tiny_llava_folder, dataset_file):
    model, processor = load_model(str(tiny_llava_folder), device="cpu")
    example = load_dataset(dataset_file).examples[1]
    example.question = "what is it ? ASSISTANT:"  # the chat format, with no place for its image
    with pytest.raises(FlashVLMError, match=r"^dataset line 2 \(id 'b'\): the prompt .* has 0 <image> for 1 image"):
        answer_questions(model, processor, [example], "flashvlm", 8, prompt_suffix="", progress=False)
    example.question = "<image> or <image> ?"
    with pytest.raises(FlashVLMError, match=r"^dataset line 2 \(id 'b'\): the prompt .* has 2 <image> for 1 image"):
        answer_questions(model, processor, [example], "flashvlm", 8, prompt_suffix="", progress=False)


# -- evaluation -----------------------------------------------------------------------------


def test_evaluate_batches_rows_like_single_rows(tiny_llava_folder, dataset_file, monkeypatch):
    model, processor = load_model(str(tiny_llava_folder), device="cpu")
    examples = load_dataset(dataset_file).examples
    recorder = recording_selector(monkeypatch)
    batched = answer_questions(
        model, processor, examples, "flashvlm", 12, batch_size=3, max_new_tokens=3, progress=False
    )
    batch_rows = recorder.rows()
    recorder.second_path()  # perturbed under FLASHVLM_TEST_PERTURBATION
    single = answer_questions(
        model, processor, examples, "flashvlm", 12, batch_size=1, max_new_tokens=3, progress=False
    )
    # A batch and single rows agree to the last bits of the features (tests/agreement.py):
    # each example's answer and kept tokens compare exactly where its selections agree.
    single_rows = recorder.rows()
    owners = [example.id for example in examples for _ in example.images]  # single runs: one row per image
    swapped, swaps = set(), 0
    for (in_batch, alone), owner in zip(match_rows(batch_rows, single_rows), owners):
        row_swaps = check_same_selection(in_batch, alone, flashvlm.get_method("flashvlm"))
        swaps += row_swaps
        if row_swaps:
            swapped.add(owner)
    SWAPS.append(("answer_questions: a batch of 3 vs single rows", swaps, sum(len(row.kept) for row in single_rows)))
    for batch_row, single_row in zip(batched, single):
        if batch_row.id not in swapped:
            assert (batch_row.prediction, batch_row.kept_indices) == (single_row.prediction, single_row.kept_indices)
    assert [row.visual_tokens for row in batched] == [[12], [12], [12, 12]]
    assert all(len(kept) == 12 for row in batched for kept in row.kept_indices)
    assert all(row.prefill_seconds > 0 and row.selection_seconds > 0 for row in batched)
    assert [row.family for row in batched] == ["colour", "count", None]
    assert processor.tokenizer.padding_side == "left"


def recording_selector(monkeypatch) -> SelectionRecorder:
    """Make ``answer_questions`` record its method's calls in the returned recorder (tests/agreement.py)."""
    recorder = SelectionRecorder(None)
    real_prune = flashvlm.eval.answers.prune

    @contextmanager
    def recording_prune(*args, **kwargs):
        with real_prune(*args, **kwargs) as pruner:
            recorder.selector, pruner.selector = pruner.selector, recorder
            yield pruner

    monkeypatch.setattr(flashvlm.eval.answers, "prune", recording_prune)
    return recorder


def test_a_question_the_prompt_lacks_is_named_by_dataset_line_and_id(tiny_llava_folder, dataset_file, monkeypatch):
    # A chat format that loses the question (here: every prompt asks "how many shape ?").
    monkeypatch.setattr(
        "flashvlm.eval.answers.chat_prompt", lambda *_args: "USER: <image>\nhow many shape ? ASSISTANT:"
    )
    model, processor = load_model(str(tiny_llava_folder), device="cpu")
    examples = load_dataset(dataset_file).examples[:2]  # lines 1 and 2; the second asks "how many shape ?"
    with pytest.raises(FlashVLMError) as caught:
        answer_questions(model, processor, examples[::-1], "flashvlm:question", 8, batch_size=2, progress=False)
    message = str(caught.value)
    assert message.startswith("dataset line 1 (id 'a'): question 'what is the color of the circle ?' does not")
    assert "row 1" not in message and "\n" not in message


# -- flashvlm compare -----------------------------------------------------------------------


def test_compare_writes_table_csv_plot_and_predictions(tiny_llava_folder, dataset_file, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(
        ["compare", "--model", str(tiny_llava_folder), "--data", str(dataset_file), "--methods", "flashvlm,fastv",
         "--budgets", "16,25%", "--batch-size", "2", "--out", str(out), "--max-new-tokens", "2", "--no-progress"]
    )  # fmt: skip
    assert status == 0
    with open(out / "compare.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["budget"]) for row in rows] == [
        ("none", "all"), ("flashvlm", "16"), ("flashvlm", "25%"), ("fastv", "16"), ("fastv", "25%")
    ]  # fmt: skip
    assert [row["visual_tokens"] for row in rows] == ["64.0", "16.0", "16.0", "16.0", "16.0"]
    assert {"accuracy", "relative_to_none", "prefill_ms", "accuracy[colour]", "accuracy[count]"} <= set(rows[0])
    table = (out / "compare.md").read_text()
    assert "| flashvlm | 16 | 3 |" in table
    assert "- line 7: missing field 'answer'" in table
    assert (out / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 5 * 3 and {"kept_indices", "correct", "prediction"} <= set(predictions[0])
    assert "skipped" in capsys.readouterr().err


def test_compare_without_matplotlib_writes_the_rest_and_names_the_extra(
    tiny_llava_folder, dataset_file, tmp_path, capsys, monkeypatch
):
    import flashvlm.cli.compare as compare

    monkeypatch.setattr(compare, "plotting_available", lambda: False)
    out = tmp_path / "out"
    argv = ["compare", "--model", str(tiny_llava_folder), "--data", str(dataset_file), "--methods", "flashvlm",
            "--budgets", "16", "--out", str(out), "--max-new-tokens", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert {path.name for path in out.iterdir()} >= {"compare.csv", "compare.md", "predictions.jsonl"}
    assert not (out / "accuracy_vs_budget.png").exists()
    assert 'needs the matplotlib package: pip install "flashvlm[plot]"' in capsys.readouterr().err


def test_compare_finds_the_question_through_a_lowercasing_tokenizer(tmp_path, capsys):
    from scene_llava import FOLDER as SCENE_LLAVA

    from flashvlm.demo import EXAMPLES_DIR

    image = EXAMPLES_DIR / "attribute.png"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "q", "image": str(image), "question": "What COLOR is the square ?", "answer": "red"})
    )
    argv = [
        "compare",
        "--model",
        str(SCENE_LLAVA),
        "--device",
        "cpu",
        "--data",
        str(rows),
        "--out",
        str(tmp_path / "out"),
    ]
    argv += ["--methods", "flashvlm:question", "--budgets", "28", "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "flashvlm,nope"], "unknown method 'nope'"),
        (["--budgets", "64,0"], "budget must be >= 1"),
        (["--budgets", "1.5"], "ratio"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--on-bad-row", "stop"], "line 5: image file not found"),
    ],
)
def test_compare_rejects_bad_input_with_exit_2(tiny_llava_folder, dataset_file, tmp_path, capsys, arguments, message):
    base = ["compare", "--model", str(tiny_llava_folder), "--data", str(dataset_file), "--out", str(tmp_path / "o")]
    assert main(base + arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and error[-1].startswith("flashvlm compare: error:")


def test_compare_rejects_missing_or_empty_data(tiny_llava_folder, tmp_path, capsys):
    base = ["compare", "--model", str(tiny_llava_folder), "--out", str(tmp_path / "o")]
    assert main(base + ["--data", str(tmp_path / "absent.jsonl")]) == 2
    assert "dataset file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "x"}\n')
    assert main(base + ["--data", str(empty)]) == 2
    assert "has no usable rows (1 skipped)" in capsys.readouterr().err
