"""``flashvlm compare`` keeps its work: a journal of finished predictions, --resume, atomic outputs,
and an --out that is checked before any model is loaded."""

from __future__ import annotations

import csv
import errno
import io
import json
import os

import pytest
import torch
from PIL import Image

from flashvlm.cli import compare, main
from flashvlm.eval import journal as journal_module

NUM_ROWS = 6
TIME_COLUMNS = ("selection_ms", "prefill_ms", "total_ms")
TIME_FIELDS = ("selection_seconds", "prefill_seconds")


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    """Six good rows over two images."""
    folder = tmp_path_factory.mktemp("rows")
    generator = torch.Generator().manual_seed(1)
    for index in range(2):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    questions = ["what is the color of the circle ?", "how many shape ?", "is the square red ?"]
    rows = [
        {"id": f"r{index}", "image": f"{index % 2}.png", "question": questions[index % 3], "answer": "red"}
        for index in range(NUM_ROWS)
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def compare_argv(tiny_llava_folder, rows_file):
    def argv(out, *extra):
        return [
            "compare", "--model", str(tiny_llava_folder), "--data", str(rows_file), "--methods", "flashvlm,visionzip",
            "--budgets", "8,25%", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--out", str(out),
            *extra,
        ]  # fmt: skip

    return argv


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(compare, "load_model", refuse)


def table(out) -> list[dict]:
    """compare.csv without its time columns (measurements, never equal across runs)."""
    with open(out / "compare.csv", newline="", encoding="utf-8") as file:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(file)]


def predictions(out) -> list[dict]:
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS} for line in lines]


def error_line(err: str) -> str:
    """The one error line (transformers' weight-loading bar may precede it on stderr)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def interrupt_after(monkeypatch, batches: int) -> None:
    """Ctrl-C after ``batches`` batches have finished (and been journaled)."""
    real_answer_questions = compare.answer_questions
    finished = []

    def answer_questions(*args, on_batch=None, **kwargs):
        def counted(rows):
            on_batch(rows)
            finished.append(len(rows))
            if len(finished) == batches:
                raise KeyboardInterrupt

        return real_answer_questions(*args, on_batch=counted if on_batch else None, **kwargs)

    monkeypatch.setattr(compare, "answer_questions", answer_questions)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llava_folder, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    argv = [
        "compare", "--model", str(tiny_llava_folder), "--data", str(rows_file), "--methods", "flashvlm,visionzip",
        "--budgets", "8,25%", "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_interrupted_run_keeps_every_finished_prediction_and_resume_gives_the_same_table(
    uninterrupted, compare_argv, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 5)  # reference: 3 batches, then 2 of flashvlm @ 8
    assert main(compare_argv(out)) == 130
    err = capsys.readouterr().err
    assert "interrupted; 10 finished predictions are kept" in err and "--resume" in err
    journal = (out / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 10
    assert not (out / "compare.csv").exists()

    # A kill in the middle of an append leaves a line without its newline: dropped, then cut off.
    with open(out / "journal.jsonl", "a") as file:
        file.write('{"method": "flashvlm", "budget": "8", "id": "r4", "predic')
    monkeypatch.undo()
    evaluated = []
    real_answer_questions = compare.answer_questions
    monkeypatch.setattr(
        compare, "answer_questions", lambda model, processor, rows, *a, **k: evaluated.append(len(rows)) or real_answer_questions(model, processor, rows, *a, **k)
    )  # fmt: skip
    assert main(compare_argv(out, "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    assert evaluated[1:] == [2, 6, 6, 6]  # after the warm-up: only what was left, nothing twice
    assert table(out) == table(uninterrupted)
    assert predictions(out) == predictions(uninterrupted)
    assert len((out / "journal.jsonl").read_text().splitlines()) == 5 * NUM_ROWS


def test_a_limit_stages_a_run_that_resume_completes(uninterrupted, compare_argv, tmp_path):
    out = tmp_path / "run"
    assert main(compare_argv(out, "--limit", "3")) == 0
    assert [row["examples"] for row in table(out)] == ["3"] * 5
    assert main(compare_argv(out, "--resume")) == 0
    assert table(out) == table(uninterrupted)


def test_an_earlier_run_is_neither_mixed_nor_overwritten_silently(uninterrupted, compare_argv, no_model, capsys):
    before = (uninterrupted / "compare.csv").read_bytes()
    assert main(compare_argv(uninterrupted)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err and "\n" not in err
    assert main(compare_argv(uninterrupted, "--budgets", "8", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "budgets was ['8', '25%'], now ['8']" in err and "\n" not in err
    assert main(compare_argv(uninterrupted, "--budgets", "25%,8", "--resume")) == 2  # another order: another table
    assert "budgets was ['8', '25%'], now ['25%', '8']" in capsys.readouterr().err
    assert (uninterrupted / "compare.csv").read_bytes() == before
    # Everything is done: --resume rewrites the outputs from the journal without loading the model.
    assert main(compare_argv(uninterrupted, "--resume")) == 0
    assert (uninterrupted / "compare.csv").read_bytes() == before
    # The same budgets spelt otherwise are the same run (they were "other settings").
    assert main(compare_argv(uninterrupted, "--budgets", "8.0, 0.25", "--resume")) == 0
    assert (uninterrupted / "compare.csv").read_bytes() == before


def test_overwrite_starts_again(compare_argv, tmp_path):
    out = tmp_path / "run"
    assert main(compare_argv(out, "--limit", "2", "--methods", "flashvlm", "--budgets", "8")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(compare_argv(out, "--limit", "1", "--methods", "flashvlm", "--budgets", "8", "--overwrite")) == 0
    assert [row["examples"] for row in table(out)] == ["1", "1"]
    assert len((out / "journal.jsonl").read_text().splitlines()) == 2
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def files_of(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


@pytest.mark.parametrize(
    ("option", "typo", "message"),
    [
        ("--model", "modle", "no model folder"),
        ("--device", "cpux", "unknown device 'cpux'"),
        ("--dtype", "float61", "unknown dtype 'float61'"),
    ],
)
def test_overwrite_with_a_typo_keeps_the_earlier_run(
    compare_argv, tiny_llava_folder, tmp_path, capsys, option, typo, message
):
    out = tmp_path / "run"
    assert main(compare_argv(out, "--limit", "1", "--methods", "flashvlm", "--budgets", "8")) == 0
    before = files_of(out)
    value = str(tiny_llava_folder / typo) if option == "--model" else typo
    assert main(compare_argv(out, "--limit", "1", option, value, "--overwrite")) == 2
    assert message in error_line(capsys.readouterr().err)
    assert files_of(out) == before


@pytest.mark.parametrize(("option", "typo"), [("--dtype", "fp61"), ("--device", "cpux"), ("--model", "modle")])
def test_a_run_that_never_started_blocks_neither_a_new_run_nor_resume(
    compare_argv, tiny_llava_folder, tmp_path, capsys, option, typo
):
    out = tmp_path / "run"
    value = str(tiny_llava_folder / typo) if option == "--model" else typo
    assert main(compare_argv(out, "--limit", "1", option, value)) == 2
    assert not (out / "run.json").exists()
    assert main(compare_argv(out, "--limit", "1", "--dtype", "fp32")) == 0
    assert json.loads((out / "run.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
    for spelling in ("float32", "auto", "float"):  # one dtype on a CPU, however it is written
        assert main(compare_argv(out, "--device", "cpu", "--dtype", spelling, "--resume")) == 0
        assert "resuming" in capsys.readouterr().err


def test_a_settings_file_alone_is_no_earlier_run(compare_argv, tmp_path, capsys):
    # What an earlier version left when the model failed to load: run.json, and nothing run.
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"dtype": "fp16", "budgets": ["8"]}))
    assert main(compare_argv(out, "--limit", "1")) == 0
    assert json.loads((out / "run.json").read_text())["budgets"] == ["8", "25%"]


@pytest.mark.parametrize("case", ["file", "file above", "missing parent", "read-only"])
def test_unusable_out_is_refused_before_the_model_loads(compare_argv, tmp_path, no_model, monkeypatch, capsys, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("a file")
        message = "is a file"
    elif case == "file above":
        (tmp_path / "afile").write_text("a file")
        out = tmp_path / "afile" / "out"
        message = f"--out {out}: {tmp_path / 'afile'} is a file, not a folder"
    elif case == "missing parent":
        out = tmp_path / "absent" / "out"
        message = "does not exist"
    else:  # chmod does not stop root, so the file system says no instead

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("flashvlm.files.tempfile.TemporaryFile", read_only)
        message = f"cannot write in {tmp_path}: Read-only file system"
    assert main(compare_argv(out)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_a_full_disk_loses_neither_the_other_outputs_nor_the_predictions(compare_argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write = compare.write_text_atomic

    def full_disk_for_the_table(path, text):
        if path.name == "compare.md":
            raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        real_write(path, text)

    monkeypatch.setattr(compare, "write_text_atomic", full_disk_for_the_table)
    assert main(compare_argv(out, "--limit", "2")) == 2
    err = error_line(capsys.readouterr().err)
    assert "compare.md: No space left on device" in err and "1 of 4 outputs not written" in err
    assert {"predictions.jsonl", "compare.csv", "accuracy_vs_budget.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "compare.md").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(compare_argv(out, "--limit", "2", "--resume")) == 0
    assert (out / "compare.md").read_text().startswith("# flashvlm compare")


def test_a_full_disk_while_journaling_keeps_what_was_journaled(compare_argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_fsync = os.fsync
    journaled = []

    def fsync(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("journal.jsonl"):
            if len(journaled) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            journaled.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(compare_argv(out)) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot append to" in err and "journal.jsonl: No space left on device" in err
    # The two batches before the failure are on disk (the third was written, its fsync failed).
    assert len(compare.RunJournal(out / "journal.jsonl").read().results[("none", "all")]) >= 4


def test_a_full_disk_at_a_journal_write_names_the_journal_and_resume(compare_argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_open = open

    class FullAfterTwoWrites(io.RawIOBase):
        """The journal's file as the disk fills: two writes go through, then every one fails."""

        def __init__(self, path):
            self.file = real_open(path, "ab", buffering=0)
            self.writes = 0

        def writable(self):
            return True

        def write(self, data):
            self.writes += 1
            if self.writes > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def fileno(self):
            return self.file.fileno()

        def close(self):
            self.file.close()
            super().close()

    monkeypatch.setattr(
        journal_module, "open", lambda path, mode: io.BufferedWriter(FullAfterTwoWrites(path)), raising=False
    )
    assert main(compare_argv(out)) == 2
    err = error_line(capsys.readouterr().err)
    assert f"cannot append to {out / 'journal.jsonl'}: No space left on device" in err
    assert f"4 finished predictions are kept in {out / 'journal.jsonl'}; rerun with --resume to continue" in err
    monkeypatch.undo()
    assert main(compare_argv(out, "--resume")) == 0
    assert len((out / "journal.jsonl").read_text().splitlines()) == 5 * NUM_ROWS


def test_repeated_methods_and_budgets_run_once(compare_argv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = compare_argv(out, "--limit", "1", "--methods", "flashvlm,flashvlm,none", "--budgets", "8,8.0,25%,0.25")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: method flashvlm repeated; each runs once" in err
    assert "note: budget 8.0, 0.25 repeated; each runs once" in err
    assert [(row["method"], row["budget"]) for row in table(out)] == [
        ("none", "all"), ("flashvlm", "8"), ("flashvlm", "25%")
    ]  # fmt: skip


def test_journal_reads_back_rows_and_unavailable_runs_and_cuts_a_torn_last_line(tmp_path):
    from flashvlm.errors import FlashVLMError
    from flashvlm.eval import RowResult
    from flashvlm.eval.journal import RunJournal

    row = RowResult("r0", "red", "red", True, None, [2], [[0, 5]], 0.1, 0.2)
    journal = RunJournal(tmp_path / "journal.jsonl")
    assert journal.read().num_predictions == 0
    with journal:
        journal.append_rows("flashvlm", "25%", [row])
        journal.append_unavailable("visionzip", "8", "needs a CLS token")
    with open(journal.path, "ab") as file:
        file.write(b'{"method": "flash')  # a kill in the middle of an append
    contents = journal.read()
    assert contents.results == {("flashvlm", "25%"): {"r0": row}}
    assert contents.unavailable == {("visionzip", "8"): "needs a CLS token"}
    with journal:
        journal.append_rows("flashvlm", "8", [row])
    assert journal.path.read_text().count("\n") == 3 and journal.read().num_predictions == 2
    journal.path.write_text('{"method": "flashvlm"}\n')
    with pytest.raises(FlashVLMError, match="line 1 is not a journal record"):
        journal.read()
