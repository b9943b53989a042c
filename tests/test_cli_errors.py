"""Command-line defects, one regression test each: bad input is one line and exit 2,
found before any model loads, and a full disk loses nothing written before."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import stat

import pytest
import torch
from PIL import Image
from scene_llava import FOLDER as SCENE_LLAVA

from flashvlm.cli import bench, demo, generate, main
from flashvlm.eval import DatasetError, answer_questions, load_dataset
from flashvlm.files import write_text_atomic
from flashvlm.loading import load_model
from flashvlm.selection import parse_budget

TINY_BENCH = [
    "bench", "--model", "llava-1.5-7b", "--scale", "tiny", "--methods", "flashvlm", "--repeats", "2",
    "--warmup", "0", "--new-tokens", "1", "--text-tokens", "12", "--device", "cpu", "--budgets", "25%", "8",
]  # fmt: skip


def error_line(err: str) -> str:
    """The one error line (transformers' weight-loading bar may precede it on stderr)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a subcommand gets as far as loading or building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for module, name in ((generate, "load_model"), (demo, "load_model"), (bench, "load_model_for_bench")):
        monkeypatch.setattr(module, name, refuse)


def full_disk_for(monkeypatch, name: str) -> None:
    """Writes to files named ``name`` (and their temporary twins) fail as on a full disk, at fsync."""
    real_fsync = os.fsync

    def fsync(descriptor):
        if name in os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


# -- generate and demo: refused before the model loads ---------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1; got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1; got -1"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "  \n "], "--prompt is empty"),
        (["--prompt", "<image> <image> what is it?"], "--prompt has 2 <image> placeholders for 1 image"),
        (["--budget", "150%"], "got 150%"),
        (["--budget", "2.5"], "got 2.5"),
    ],
)
def test_generate_refuses_before_loading(sample_image_file, no_model, capsys, change, message):
    argv = ["generate", "--model", "unused", "--image", str(sample_image_file), "--prompt", "what?", *change]
    assert main(argv) == 2
    assert message in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1; got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1; got -1"),
        (["--prompt", " "], "--prompt is empty"),
        (["--prompt", "<image>\n<image>\nwhat?"], "--prompt has 2 <image> placeholders for 1 image"),
        (["--budget", "150%"], "got 150%"),
    ],
)
def test_demo_refuses_before_loading(tmp_path, no_model, capsys, change, message):
    assert main(["demo", "--out", str(tmp_path / "demo.png"), *change]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_a_placeholder_per_image_is_used_as_written(tiny_llava_folder, sample_image_file, capsys):
    image = str(sample_image_file)
    argv = ["generate", "--model", str(tiny_llava_folder), "--image", image, "--image", image, "--max-new-tokens", "1"]
    assert main([*argv, "--prompt", "USER: <image> and <image>\nsame? ASSISTANT:", "--budget", "64.0"]) == 0
    assert capsys.readouterr().out.count("kept 64 of 64 visual tokens") == 2


def test_integral_budgets_are_counts():
    assert parse_budget("64.0") == 64 and isinstance(parse_budget("64.0"), int)
    assert parse_budget("1e3") == 1000 and isinstance(parse_budget("1e3"), int)
    assert parse_budget("1") == 1 and parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)


def test_demo_on_a_full_disk_keeps_the_earlier_figure(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out)
    before = out.read_bytes()
    full_disk_for(monkeypatch, "demo.png")
    assert main(["demo", "--out", str(out), "--device", "cpu", "--max-new-tokens", "1", "--example", "attribute"]) == 2
    assert f"cannot write {out}: No space left on device" in error_line(capsys.readouterr().err)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["demo.png"]


def test_demo_out_in_a_read_only_folder_is_refused_before_loading(tmp_path, no_model, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("flashvlm.files.tempfile.TemporaryFile", read_only)
    assert main(["demo", "--out", str(tmp_path / "new" / "demo.png")]) == 2
    assert f"cannot write in {tmp_path}: Read-only file system" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_a_new_output_follows_the_umask_and_a_rewritten_one_keeps_its_mode(tmp_path, umask):
    existing = tmp_path / "notes.md"
    existing.write_text("mine")
    existing.chmod(0o640)
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "new.md", "new")
        write_text_atomic(existing, "rewritten")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.md").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and existing.read_text() == "rewritten"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_rewritten_output_keeps_its_owner(tmp_path):
    existing = tmp_path / "bench.json"
    existing.write_text("theirs")
    os.chown(existing, 1234, 1234)
    existing.chmod(0o600)
    write_text_atomic(existing, "new")  # was now root's, 0600: its owner could no longer read it
    status = existing.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (1234, 1234, 0o600)


def test_an_output_that_is_a_symbolic_link_writes_where_it_points(tmp_path):
    target = tmp_path / "reports" / "bench.md"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "bench.md"
    link.symlink_to(target)
    write_text_atomic(link, "new")  # the link was replaced by a file of its own, the target left "old"
    assert link.is_symlink() and target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    dangling = tmp_path / "new.md"
    dangling.symlink_to(target.parent / "new.md")
    write_text_atomic(dangling, "created")
    assert dangling.is_symlink() and (target.parent / "new.md").read_text() == "created"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.md", "new.md", "reports"]


def test_a_symbolic_link_to_nowhere_is_refused_before_loading(tmp_path, no_model, capsys):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "missing")
    compare = ["compare", "--model", "unused", "--data", "unused.jsonl", "--methods", "flashvlm", "--device", "cpu"]
    assert main([*compare, "--out", str(out)]) == 2  # the model loaded, then mkdir said "File exists"
    assert f"--out {out} is a symbolic link to {tmp_path / 'missing'}, which does not exist" in error_line(
        capsys.readouterr().err
    )
    report = tmp_path / "report.md"
    report.symlink_to(tmp_path / "missing" / "report.md")
    assert main([*TINY_BENCH, "--markdown", str(report)]) == 2  # the write failed after the whole bench
    message = error_line(capsys.readouterr().err)
    assert f"--markdown {report} links to {tmp_path / 'missing' / 'report.md'}, whose folder does not exist" in message
    assert out.is_symlink() and report.is_symlink() and not (tmp_path / "missing").exists()


def test_a_processor_that_cannot_load_is_explained_in_full(tmp_path, sample_image_file, capsys):
    folder = tmp_path / "model"
    shutil.copytree(SCENE_LLAVA, folder)
    (folder / "tokenizer.json").unlink()
    argv = ["generate", "--model", str(folder), "--image", str(sample_image_file), "--prompt", "what?"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = error_line(capsys.readouterr().err)
    # transformers says why over four lines; the last one says what to install
    assert f"could not load the processor of {folder}: Couldn't instantiate the backend tokenizer" in err
    assert "(1) a `tokenizers` library serialization file" in err and "sentencepiece or tiktoken" in err


def test_method_errors_name_only_what_can_be_named(capsys):
    compare = ["compare", "--model", "unused", "--data", "unused.jsonl"]
    assert main([*compare, "--methods", "none"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--methods names no method to compare (none, the unpruned reference, always runs)" in err
    assert "flashvlm" in err and ", none" not in err and "of none" not in err
    assert main([*compare, "--methods", "random:release"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "method 'random' has no presets; got 'release': name it alone, 'random'" in err
    assert main([*compare, "--methods", "flashvlm:nonsense"]) == 2
    assert "method 'flashvlm' has no preset 'nonsense'; its presets: " in error_line(capsys.readouterr().err)


# -- bench -----------------------------------------------------------------------------------


def test_bench_refuses_an_unknown_attention_and_an_unwritable_json_before_building(
    tmp_path, no_model, monkeypatch, capsys
):
    assert main(["bench", "--attn", "bogus"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--attn must be one of eager, " in err and "sdpa" in err and "got 'bogus'" in err
    (tmp_path / "taken").mkdir()
    assert main(["bench", "--json", str(tmp_path / "taken")]) == 2
    assert f"--json {tmp_path / 'taken'} is a folder; name a file" in error_line(capsys.readouterr().err)


def test_bench_shows_budgets_as_written_and_flags_unsteady_ratios(tmp_path, monkeypatch, capsys):
    markdown = tmp_path / "performance.md"
    markdown.write_text("# Performance\n\nearlier sections\n")
    monkeypatch.setattr("flashvlm.bench.prefill.UNSTEADY_SPREAD", -1.0)  # every spread counts as too wide
    full_disk_for(monkeypatch, "performance.md")
    assert main([*TINY_BENCH, "8.0", "--json", str(tmp_path / "bench.json"), "--markdown", str(markdown)]) == 2
    captured = capsys.readouterr()
    assert f"cannot write {markdown}: No space left on device" in error_line(captured.err)
    assert "note: budget 8.0 repeated" in captured.err
    assert markdown.read_text() == "# Performance\n\nearlier sections\n"  # the document is intact
    lines = captured.out.splitlines()
    rows = [line.split() for line in lines if line.lstrip().startswith("flashvlm")]
    assert [row[1] for row in rows] == ["25%", "8"]
    assert all("(unsteady)" in line for line in lines if line.lstrip().startswith("flashvlm"))
    assert "warning: measured/ideal marked (unsteady)" in captured.err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [row["budget"] for row in report["rows"]] == [None, "25%", "8"]
    assert all(row["speedup_unsteady"] for row in report["rows"][1:])


def test_one_token_and_every_token_are_two_budgets(tmp_path, capsys):
    # 1 is one token, 1.0 (100%) is every token: equal as numbers, two budgets all the same.
    assert main([*TINY_BENCH, "--budgets", "1", "100%", "1.0", "--json", str(tmp_path / "bench.json")]) == 0
    captured = capsys.readouterr()
    assert "note: budget 1.0 repeated" in captured.err
    rows = [line.split() for line in captured.out.splitlines() if line.lstrip().startswith("flashvlm")]
    assert [(row[1], row[2]) for row in rows] == [("1", "1"), ("100%", "576")]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(row["budget"], row["kept_tokens"]) for row in report["rows"][1:]] == [("1", 1), ("100%", 576)]


def test_one_outlier_does_not_make_a_case_unsteady_but_a_wide_middle_does():
    from flashvlm.bench.prefill import UNSTEADY_SPREAD, _spread

    assert _spread([10.0]) == 0.0
    assert _spread([10.0, 10.0, 10.0, 10.0, 100.0]) == 0.0  # the median ignores it, and so does the flag
    assert _spread([10.0, 14.0, 20.0, 26.0, 30.0]) > UNSTEADY_SPREAD


# -- datasets --------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "0.png")
    return tmp_path


def row(id: str, question: str = "what colour?") -> bytes:
    return (
        json.dumps({"id": id, "image": "0.png", "question": question, "answer": "red"}, ensure_ascii=False) + "\n"
    ).encode()


def test_a_row_that_is_not_utf8_is_reported_by_line(image_folder):
    path = image_folder / "rows.jsonl"
    path.write_bytes(row("a") + row("b", "caf\u00e9 ?").replace("\u00e9".encode(), b"\xe9") + row("c"))
    dataset = load_dataset(path)
    assert [example.id for example in dataset.examples] == ["a", "c"]
    assert [(bad.line, bad.reason) for bad in dataset.bad_rows] == [
        (2, "not UTF-8 text (byte 0xe9 at column 47); save the file as UTF-8")
    ]
    with pytest.raises(DatasetError, match="rows.jsonl line 2: not UTF-8 text"):
        load_dataset(path, on_bad_row="stop")


def test_a_utf8_byte_order_mark_is_accepted(image_folder):
    path = image_folder / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row("a") + row("b", "caf\u00e9 ?"))
    dataset = load_dataset(path)
    assert [example.id for example in dataset.examples] == ["a", "b"] and not dataset.bad_rows
    assert dataset.examples[1].question == "caf\u00e9 ?"


def test_a_compressed_file_is_named_in_one_line(image_folder, tiny_llava_folder, capsys):
    path = image_folder / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(row("a")))
    with pytest.raises(DatasetError, match="is a gzip-compressed file; decompress it first"):
        load_dataset(path)
    argv = ["compare", "--model", str(tiny_llava_folder), "--data", str(path), "--out", str(image_folder / "out")]
    assert main(argv) == 2
    assert "rows.jsonl.gz is a gzip-compressed file" in error_line(capsys.readouterr().err)


def test_a_folder_given_as_the_dataset_is_named_as_a_folder(image_folder, tiny_llava_folder, capsys):
    argv = [
        "compare",
        "--model",
        str(tiny_llava_folder),
        "--data",
        str(image_folder),
        "--out",
        str(image_folder / "out"),
    ]
    assert main(argv) == 2
    assert f"dataset {image_folder} is a folder, not a file" in error_line(capsys.readouterr().err)


# -- progress ---------------------------------------------------------------------------------


def test_the_reference_progress_bar_says_unpruned(tiny_llava_folder, image_folder, capsys):
    path = image_folder / "rows.jsonl"
    path.write_bytes(row("a"))
    model, processor = load_model(str(tiny_llava_folder), device="cpu")
    answer_questions(model, processor, load_dataset(path).examples, "none", 1, max_new_tokens=1, progress=True)
    err = capsys.readouterr().err
    assert "none (unpruned)" in err and "none @" not in err
