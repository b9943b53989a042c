"""The grounded VQA benchmark: determinism, splits, answers, export schema, hit geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flashvlm.demo.model import GRID, IMAGE_SIZE
from flashvlm.eval import load_dataset
from lab.scenes import (
    COLORS,
    FAMILIES,
    NUMBERS,
    SHAPES,
    answer_words,
    ask,
    example_rng,
    holds,
    make_example,
    scene_signature,
    split_example,
)
from lab.splits import export_split, object_hits, object_tokens, split_examples, target_indices


def test_examples_are_deterministic_by_seed():
    first = [split_example(0, "test", i) for i in range(6)]
    again = [split_example(0, "test", i) for i in range(6)]
    assert [scene_signature(e) for e in first] == [scene_signature(e) for e in again]
    assert [e.question for e in first] == [e.question for e in again]
    assert np.array_equal(np.asarray(first[0].render()), np.asarray(again[0].render()))
    other_seed = [split_example(1, "test", i) for i in range(6)]
    assert [scene_signature(e) for e in first] != [scene_signature(e) for e in other_seed]


def test_splits_are_disjoint():
    signatures = {
        split: {scene_signature(e) for e in split_examples(split, 120)} for split in ("train", "validation", "test")
    }
    assert all(len(s) == 120 for s in signatures.values())
    assert not signatures["train"] & signatures["validation"]
    assert not signatures["train"] & signatures["test"]
    assert not signatures["validation"] & signatures["test"]


def test_families_are_balanced_and_answers_are_grounded():
    examples = split_examples("validation", 200)
    assert {f: sum(e.family == f for e in examples) for f in FAMILIES} == {f: 50 for f in FAMILIES}
    assert all(e.answer in answer_words() for e in examples)
    for e in examples:
        if e.family == "attribute":
            obj = e.objects[e.target]
            assert e.answer == (obj.color if e.answer in COLORS else obj.shape)
        elif e.family == "existence":
            assert (e.answer == "yes") == (e.target is not None)
        elif e.family == "counting":
            assert e.answer == NUMBERS[len(e.target)]
        else:
            a, b = (e.objects[i] for i in e.target)
            relation = next(r for r in ("left of", "right of", "above", "below") if f" {r} " in e.question)
            assert (e.answer == "yes") == holds(relation, a, b)
    yes = [e.answer == "yes" for e in examples if e.family in ("existence", "relation")]
    assert 0.35 < sum(yes) / len(yes) < 0.65


def test_follow_up_questions_are_true_of_their_scene():
    """`ask`'s questions (training's extra turns) are answered by the scene, as the benchmark's are."""
    rng = example_rng(0, "follow-up", 0)
    asked = {family: 0 for family in FAMILIES}
    for index in range(60):
        objects = make_example(rng, FAMILIES[index % 4]).objects
        for family in FAMILIES:
            question_answer = ask(rng, objects, family)
            if question_answer is None:
                continue
            question, answer = question_answer
            asked[family] += 1
            words = question.split()
            assert answer in answer_words()
            if question.startswith("what color is the"):  # a unique shape's colour
                (obj,) = [o for o in objects if o.shape == words[4]]
                assert answer == obj.color
            elif question.startswith("what shape is the"):  # a unique colour's shape
                (obj,) = [o for o in objects if o.color == words[4]]
                assert answer == obj.shape
            elif family == "existence":
                present = any((o.color, o.shape) == (words[3], words[4]) for o in objects)
                assert (answer == "yes") == present
                if not present:  # a near miss, as the benchmark's negatives
                    assert any(o.color == words[3] or o.shape == words[4] for o in objects)
            elif family == "counting":
                count = sum(words[2] in (o.color, o.shape + "s") for o in objects)
                assert answer == NUMBERS[count] and 1 <= count <= 3
            else:
                relation = next(r for r in ("left of", "right of", "above", "below") if f" {r} " in question)
                first, second = question[len("is the ") : -len(" ?")].split(f" {relation} the ")
                (a,) = [o for o in objects if f"{o.color} {o.shape}" == first]
                (b,) = [o for o in objects if f"{o.color} {o.shape}" == second]
                assert (answer == "yes") == holds(relation, a, b)
    assert all(count >= 30 for count in asked.values()), asked
    with pytest.raises(ValueError, match="family"):
        ask(rng, objects, "colour")


def test_existence_negatives_are_near_misses():
    rng = example_rng(0, "near-miss", 0)
    for _ in range(20):
        e = make_example(rng, "existence")
        if e.answer == "no":
            words = e.question.split()
            color, shape = words[3], words[4]
            assert any(o.shape == shape for o in e.objects) and any(o.color == color for o in e.objects)


def test_objects_fit_and_do_not_overlap():
    for e in split_examples("test", 80):
        boxes = [o.bbox for o in e.objects]
        assert all(0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE for x0, y0, x1, y1 in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_export_writes_the_rows_compare_reads(tmp_path):
    path = export_split("test", tmp_path, size=8)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dataset = load_dataset(path, on_bad_row="stop")  # what flashvlm compare reads
    assert len(rows) == len(dataset.examples) == 8
    assert all(example.extra.keys() == {"objects", "target"} for example in dataset.examples)
    for row in rows:
        assert set(row) == {"id", "image", "question", "answer", "family", "objects", "target"}
        with Image.open(path.parent / row["image"]) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        for obj in row["objects"]:
            assert set(obj) == {"shape", "color", "size", "bbox"}
            assert obj["shape"] in SHAPES and obj["color"] in COLORS and len(obj["bbox"]) == 4
        target = row["target"]
        assert target is None or isinstance(target, int) or all(isinstance(t, int) for t in target)
        assert all(0 <= t < len(row["objects"]) for t in target_indices(row))
    assert json.loads(path.read_text().splitlines()[0])["id"] == "test-0-00000"
    # The export is the split itself: same questions as in memory.
    assert [r["question"] for r in rows] == [e.question for e in split_examples("test", 8)]


def test_object_tokens_geometry():
    assert object_tokens([0, 0, 14, 14]) == [0]
    assert object_tokens([14, 0, 28, 14]) == [1]
    assert object_tokens([10, 10, 20, 20]) == [0, 1, GRID, GRID + 1]
    assert object_tokens([IMAGE_SIZE - 5, IMAGE_SIZE - 5, IMAGE_SIZE, IMAGE_SIZE]) == [GRID * GRID - 1]
    # Another grid: 2 x 2 cells over the same image.
    assert object_tokens([100, 100, 130, 130], grid=(2, 2)) == [0, 1, 2, 3]


def test_object_hits():
    row = {"objects": [{"bbox": [0, 0, 14, 14]}, {"bbox": [20, 20, 40, 40]}, {"bbox": [200, 200, 220, 220]}]}
    assert object_hits(row, [0]) == [True, False, False]
    assert object_hits(row, [2 * GRID + 2]) == [False, True, False]  # cell (2, 2) covers x, y in [28, 42)
    assert object_hits(row, []) == [False, False, False]
    assert target_indices({"target": None}) == [] and target_indices({"target": 2}) == [2]
    assert target_indices({"target": [0, 1]}) == [0, 1]


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="family"):
        make_example(example_rng(0, "x", 0), "colour")
