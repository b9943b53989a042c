"""The lmms-eval task YAML written from a JSONL file, and the task's functions.

None of this needs lmms-eval installed; running the task through lmms-eval is in
test_lmms_eval.py. Datasets and scoring themselves are tested in test_eval.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from flashvlm.integrations.lmms_eval import jsonl_task


def write_jsonl(path, records):
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records))
    return path


@pytest.fixture
def dataset_folder(tmp_path, sample_image_file):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(sample_image_file.read_bytes())
    return tmp_path


class TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval's ``!function`` tags as plain strings."""


TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def test_task_yaml_points_at_the_data_the_functions_and_one_metric_per_family(dataset_folder):
    records = [
        {"id": i, "image": "images/a.png", "question": "q", "answer": "a", "family": family}
        for i, family in enumerate(["attribute", "relative position", "attribute"])
    ]
    path = write_jsonl(dataset_folder / "test.jsonl", records)
    written = jsonl_task.write_task(path, dataset_folder / "tasks", "demo_test", max_new_tokens=8)
    config = yaml.load(written.read_text(), Loader=TaskLoader)
    assert written == dataset_folder / "tasks" / "demo_test.yaml"
    assert config["task"] == "demo_test"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(path.resolve())
    assert config["lmms_eval_specific_kwargs"]["default"]["image_root"] == str(dataset_folder.resolve())
    assert config["generation_kwargs"] == {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": []}
    for name in ("doc_to_visual", "doc_to_text", "process_results"):
        assert config[name] == f"!function flashvlm.integrations.lmms_eval.jsonl_task.{name}"
    metrics = [entry["metric"] for entry in config["metric_list"]]
    assert metrics == ["exact_match", "exact_match_attribute", "exact_match_relative_position"]


def test_task_functions_read_the_row_and_score_with_exact_match(dataset_folder):
    doc = {"id": 1, "image": "images/a.png", "question": "what colour?", "answer": "Red", "family": "attribute"}
    (image,) = jsonl_task.doc_to_visual(doc, {"image_root": str(dataset_folder)})
    assert image.mode == "RGB"
    assert jsonl_task.doc_to_text(doc) == "what colour?"
    assert jsonl_task.process_results(doc, ["the red."]) == {"exact_match": 1.0, "exact_match_attribute": 1.0}
    assert jsonl_task.process_results({**doc, "family": None}, ["blue"]) == {"exact_match": 0.0}


def test_task_writer_command_exits_2_on_a_bad_dataset(dataset_folder, capsys):
    path = write_jsonl(dataset_folder / "test.jsonl", [{"id": 1, "image": "images/a.png", "question": "q"}])
    assert jsonl_task.main([str(path), "--task", "t", "--out", str(dataset_folder / "tasks")]) == 2
    assert "test.jsonl line 1: missing field 'answer'" in capsys.readouterr().err
    good = write_jsonl(
        dataset_folder / "good.jsonl", [{"id": 1, "image": "images/a.png", "question": "q", "answer": "a"}]
    )
    assert jsonl_task.main([str(good), "--task", "bad-name", "--out", str(dataset_folder / "tasks")]) == 2
    assert "task name must be letters" in capsys.readouterr().err
    assert jsonl_task.main([str(good), "--task", "good", "--out", str(dataset_folder / "tasks")]) == 0
    assert "--tasks good --include_path" in capsys.readouterr().out
