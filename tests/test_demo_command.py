"""``flashvlm demo`` end to end, its errors, and the kept-token drawing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flashvlm.cli import main
from flashvlm.vis import draw_kept_tokens, model_view
from lab.__main__ import main as workbench


def test_demo_answers_every_shipped_example_unpruned_with_flashvlm_and_a_baseline(tmp_path, capsys):
    from flashvlm.cli.demo import shipped_examples

    out = tmp_path / "figure" / "demo.png"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    examples = shipped_examples()
    for method in ("all 256 tokens", "flashvlm, 28 tokens (11%)", "vispruner, 28 tokens (11%)"):
        lines = [line for line in printed if line.strip().startswith(method)]
        assert len(lines) == len(examples) and all(" right " in line or " wrong " in line for line in lines)
    assert printed[-1].startswith("note: the shipped demo model")  # its answers are not evidence: said so
    with Image.open(out) as figure:  # one row of three panels per example
        assert figure.size[0] > 3 * 448 and figure.size[1] > len(examples) * 448


def test_demo_on_a_user_image(tmp_path, capsys, sample_image_file):
    out = tmp_path / "mine.png"
    args = ["demo", "--image", str(sample_image_file), "--prompt", "is there a red circle ?", "--budget", "14"]
    assert main([*args, "--method", "flashvlm", "--baseline", "none", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "flashvlm, 14 tokens (5%)" in printed and "vispruner" not in printed
    assert " right " not in printed and " wrong " not in printed  # no expected answer to mark
    assert out.is_file()


def test_demo_with_a_question_guided_method(tmp_path, capsys):
    out = tmp_path / "question.png"
    args = ["demo", "--example", "attribute", "--method", "flashvlm:question", "--baseline", "pool"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "flashvlm:question, 28 tokens (11%)" in printed and "pool, 28 tokens (11%)" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "budget"),
        (["--image", "no-such-image.png", "--prompt", "what ?"], "not found"),
        (["--image", "no-such-image.png"], "--prompt"),
        (["--example", "nope"], "unknown example"),
        (["--method", "nope"], "unknown method"),
        (["--baseline", "nope"], "unknown method"),
        (["--out", "figure.jpg"], ".png"),
        (["--model", "./no-such-model"], "no model folder"),
    ],
)
def test_demo_bad_input_exits_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *args]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_export_command(tmp_path, capsys):
    assert workbench(["export", "--split", "test", "--size", "4", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 4
    assert len(list((tmp_path / "images").glob("*.png"))) == 4


def test_draw_kept_tokens_dims_dropped_patches():
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    drawn = np.asarray(draw_kept_tokens(image, [0], (2, 2), scale=2)).astype(int)  # (64, 64, 3)
    assert drawn.shape == (64, 64, 3)
    assert (drawn[10, 10] == (200, 100, 50)).all()  # inside the kept cell: untouched
    assert drawn[50, 50].sum() < 0.5 * 350  # a dropped cell: darker
    assert tuple(drawn[0, 0]) != (200, 100, 50)  # the kept cell's outline


def test_model_view_crops_to_the_square_the_encoder_sees():
    wide = Image.new("RGB", (300, 150))
    assert model_view(wide, 224).size == (224, 224)


def test_report_table_has_every_method_budget_and_hit_rates(tmp_path, capsys):
    from lab import report

    out = tmp_path / "report.md"
    args = ["report", "--size", "8", "--methods", "flashvlm,visionzip,random", "--quiet", "--out", str(out)]
    assert workbench(args) == 0
    lines = out.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0:2] for row in rows] == [["| none", "256"]] + [
        [f"| {method}", str(budget)] for method in ("flashvlm", "visionzip", "random") for budget in report.BUDGETS
    ]
    # Every pruned row reports hit rates for the queried and the other objects.
    assert all(row.rstrip(" |").split(" | ")[-1] != "–" for row in rows[1:])
    assert workbench(["report", "--size", "0"]) == 2
    assert "--size and --batch-size must be >= 1" in capsys.readouterr().err


def test_evaluate_command_reports_accuracy_and_hit_rates(tmp_path):
    import json

    out = tmp_path / "results.json"
    assert workbench(["evaluate", "--size", "8", "--budgets", "1.0,14", "--quiet", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"1.0", "14"} and set(results["14"]["attribute_hit_rate"]) == {"queried", "others"}
    assert workbench(["train", "--out", str(tmp_path / "run"), "--stages", "clip,lm"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["speed", "--layers", "a"], "expected integers >= 1"),
        (["speed", "--layers", "40"], "SmolLM2 has 30 layers"),
        (["speed", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--out", "unused", "--lm-layers", "31"], "--lm-layers: SmolLM2 has 30 layers; got 31"),
        (["train", "--out", "unused", "--norm-weight", "-1"], "--norm-weight must be >= 0; got -1.0"),
        (["train", "--out", "unused", "--curriculum-samples", "-5"], "--curriculum-samples must be >= 0; got -5"),
        (["train", "--out", "unused", "--questions-per-image", "0"], "--questions-per-image must be >= 1; got 0"),
        (["train", "--out", "unused", "--clip-objects", "0-3"], "--clip-objects '0-3': give FEWEST-MOST"),
        (["train", "--out", "unused", "--clip-objects", "8-x"], "--clip-objects '8-x': give FEWEST-MOST"),
        (["curves", "no-such-run"], "no training log"),
    ],
)
def test_workbench_bad_input_exits_2_naming_the_value(argv, message, capsys):
    try:
        status = workbench(argv)
    except SystemExit as exit:  # argparse's own refusal of a malformed value
        status = exit.code
    assert status == 2 and message in capsys.readouterr().err
