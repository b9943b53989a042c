"""Every adapter on its tiny models: identity at full budget, exact counts, batching, generate,
half precision, and what several families share (AnyRes newlines, video budgets, Qwen M-RoPE
positions). Each family's own tests are in families/test_<family>.py."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import pytest
import torch
from agreement import SelectionRecorder, alone_as_in_batch
from families import ADAPTER_TEST_CASES, EVERY_CASE, case_named, tiny_model
from families.llava import build_tiny_llava, llava_batch
from families.shared import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    kept_per_row,
    placeholder_counts,
    selectable_tokens_sent,
    visual_placeholders,
)

import flashvlm
from flashvlm import FlashVLMError, MethodUnavailableError, TokenSelector
from flashvlm.adapters import NEWLINES
from flashvlm.selection.fastv import FastV


def is_qwen(case) -> bool:
    return case.name.startswith("qwen")


def is_anyres(case) -> bool:
    return case.name.startswith(("llava_next", "llava_onevision"))


@pytest.mark.parametrize("case", EVERY_CASE, ids=lambda case: case.name)
def test_full_budget_gives_the_unpatched_logits(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 0)
    with torch.no_grad():
        expected = model(**inputs).logits
        with flashvlm.prune(model, budget=10_000) as pruner:
            actual = model(**inputs).logits
    assert min(record.num_tokens for record in pruner.last.images) == case.tokens_per_image
    assert all(record.num_kept == record.num_tokens for record in pruner.last.images)
    real = inputs["attention_mask"].bool()
    # Rows were re-padded to the same width, so real tokens line up.
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", EVERY_CASE, ids=lambda case: case.name)
def test_none_keeps_every_view_whatever_the_budget(case):
    # A budget of 1 split in proportion over an image's views rounds most views' shares to
    # 0; a method that keeps every token must still send every view whole.
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=2, seed=4)
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1]
        with flashvlm.prune(model, 1, "none") as pruner:
            logits = model(**inputs).logits[:, -1]
    assert all(record.num_kept == record.num_tokens for record in pruner.last.images)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_budget_k_sends_exactly_k_tokens_per_unit(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 0)
    budget = case.tokens_per_image - 1
    with flashvlm.prune(model, budget=budget) as pruner:
        pruned = pruner.prune_inputs(dict(inputs))
    records = pruned.images
    assert all(record.num_kept == budget for record in records)
    selectable = selectable_tokens_sent(model, pruned.model_kwargs)
    assert torch.equal(selectable, kept_per_row(records, 3))
    if is_anyres(case):
        # Newline tokens travel outside the budget: at most one per kept row, and at least one per image.
        newlines = placeholder_counts(model, pruned.model_kwargs["input_ids"]) - selectable
        assert bool((newlines >= 1).all())
        newline = model.model.image_newline
        for tokens in pruned.model_kwargs["mm_encoder_outputs"]["image"].pooler_output:
            is_newline = (tokens == newline).all(dim=-1)
            assert int((~is_newline).sum()) == budget
            assert not bool((is_newline[1:] & is_newline[:-1]).any()), "a newline follows an emptied row"


@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if is_anyres(case)], ids=lambda case: case.name)
def test_newlines_every_row_keeps_every_rows_newline_and_the_same_tokens(case):
    """``newlines="every_row"``: an image's length is K + its rows, known from its size (vLLM)."""
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 0)
    budget = 3  # so few that some crop rows keep nothing
    lengths, kept = {}, {}
    for rule in NEWLINES:
        with flashvlm.prune(model, budget=budget, newlines=rule) as pruner:
            pruned = pruner.prune_inputs(dict(inputs))
        lengths[rule] = placeholder_counts(model, pruned.model_kwargs["input_ids"])
        kept[rule] = [record.keep_indices.tolist() for record in pruned.images]
    assert kept["every_row"] == kept["kept_rows"]
    selectable = torch.zeros(3, dtype=torch.long)
    for record in pruned.images:
        selectable[record.batch_index] += record.num_tokens
    newlines = placeholder_counts(model, inputs["input_ids"]) - selectable  # (B,) of the unpruned prompt
    assert torch.equal(lengths["every_row"], kept_per_row(pruned.images, 3) + newlines)
    assert bool((lengths["kept_rows"] < lengths["every_row"]).any())


def test_newlines_is_validated():
    model = tiny_model(case_named("llava"))
    with pytest.raises(FlashVLMError, match="newlines must be one of 'kept_rows', 'every_row'; got 'all'"):
        flashvlm.apply(model, budget=8, newlines="all")


@pytest.mark.parametrize("case", EVERY_CASE, ids=lambda case: case.name)
def test_padded_batch_generates_like_single_rows(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 1)
    budget = max(1, case.tokens_per_image // 2)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    # The batch and a row alone agree to the last bits of the vision features: kept tokens
    # compare as tests/agreement.py says (on a near-tie, the row runs on the batch's choice).
    with flashvlm.prune(model, budget=budget) as pruner:
        pruner.selector = recorder = SelectionRecorder(pruner.selector)
        batched = model.generate(**inputs, **settings)
        batch_records, batch_rows = pruner.last.images, recorder.rows()
        for row in range(3):
            single = case.select_row(inputs, row)
            label = f"{case.name}: row {row} alone vs in a batch"
            generate = partial(model.generate, **single, **settings)
            alone = alone_as_in_batch(pruner, recorder, batch_rows, "flashvlm", label, generate)
            width = single["input_ids"].shape[1]
            assert torch.equal(alone[0, width:], batched[row, inputs["input_ids"].shape[1] :]), f"row {row}"
            mine = [record.keep_indices for record in batch_records if record.batch_index == row]
            assert all(torch.equal(a, b.keep_indices) for a, b in zip(mine, pruner.last.images, strict=True))
    # The caller gets their own prompt back, followed by the new tokens.
    assert torch.equal(batched[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if case.video], ids=lambda case: case.name)
def test_video_budget_per_frame_or_per_video(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    budget = 5
    with flashvlm.prune(model, budget=budget, video_budget="per_frame") as pruner:
        per_frame = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "frame"]
    with flashvlm.prune(model, budget=budget, video_budget="per_video") as pruner:
        per_video = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "video"]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert len(per_video) == 2 and len(per_frame) > 2
    assert all(record.num_kept == budget for record in per_frame + per_video)
    # Jointly selected frames: the video's K tokens span its frames, not K per frame.
    assert all(record.num_tokens > case.tokens_per_image for record in per_video)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


def test_video_budget_is_validated():
    model = tiny_model(case_named("llava"))
    with pytest.raises(FlashVLMError, match="video_budget must be one of 'per_frame', 'per_video'; got 'frames'"):
        flashvlm.apply(model, budget=8, video_budget="frames")


@pytest.mark.parametrize("name", ["internvl", "smolvlm"])
def test_families_that_send_frames_as_images_refuse_a_per_video_budget(name):
    model = tiny_model(case_named(name))
    with pytest.raises(
        FlashVLMError, match="video_budget='per_video' is not available for .*use video_budget='per_frame'"
    ):
        flashvlm.apply(model, budget=4, video_budget="per_video")
    assert not hasattr(model, "_flashvlm_pruner")


# -- Qwen2-VL, Qwen2.5-VL and Qwen3-VL: M-RoPE positions ----------------------------------------
def generate_positions(model, inputs: dict, steps: int = 3) -> list[torch.Tensor]:
    """The position_ids every forward of a greedy generate receives: prefill first."""
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if is_qwen(case)], ids=lambda case: case.name)
def test_qwen_kept_tokens_keep_their_unpruned_positions(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 0)
    full, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )  # (3, B, L)
    unpruned = generate_positions(model, inputs)
    with flashvlm.prune(model, budget=4) as pruner:
        pruned_positions = generate_positions(model, inputs)
    pruned = pruner.last
    new_mask = pruned.model_kwargs["attention_mask"].bool()
    prefill = pruned_positions[0]  # (4, B, L'): sequence positions, then (t, h, w)

    # The keep mask the records describe: text all kept, each unit's kept placeholders.
    keep = inputs["attention_mask"].bool().clone()
    for token_id, kinds in ((IMAGE_TOKEN_ID, ("image",)), (VIDEO_TOKEN_ID, ("frame", "video"))):
        unit_masks = []
        for record in (record for record in pruned.images if record.kind in kinds):
            mask = torch.zeros(record.num_tokens, dtype=torch.bool)
            mask[record.keep_indices] = True
            unit_masks.append(mask)
        if unit_masks:
            keep[inputs["input_ids"] == token_id] = torch.cat(unit_masks)
    for row in range(3):
        torch.testing.assert_close(prefill[1:, row][:, new_mask[row]], full[:, row][:, keep[row]], rtol=0, atol=0)
        assert torch.equal(prefill[0, row][new_mask[row]], torch.arange(int(new_mask[row].sum())))
    # Decoding continues where the unpruned prompt's decoding does: the model's own
    # generate extends the last prompt position, which for images is the maximum + 1.
    assert len(pruned_positions) == len(unpruned) == 3
    for step, (positions, expected) in enumerate(zip(pruned_positions[1:], unpruned[1:]), start=1):
        torch.testing.assert_close(positions[1:], expected[1:], rtol=0, atol=0)
        if not case.video:
            assert torch.equal(positions[1, :, -1], full.amax(dim=(0, 2)) + step)
    # The cached deltas give the unpruned maximum + 1, for decoding loops that pass no positions.
    torch.testing.assert_close(
        model.model.rope_deltas[:, 0] + new_mask.sum(dim=1), full.amax(dim=(0, 2)) + 1, rtol=0, atol=0
    )


# -- half precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_half_precision_never_gives_nan(case, dtype):
    model = copy.deepcopy(tiny_model(case)).to(dtype)
    inputs = case.make_inputs(model, 2, 0)
    inputs = {
        name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for name, value in inputs.items()
    }
    budget = max(1, case.tokens_per_image // 2)
    with flashvlm.prune(model, budget) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert all(record.num_kept == budget for record in pruner.last.images)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if not case.video], ids=lambda case: case.name)
def test_placeholder_mismatch_is_a_clear_error(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    input_ids = inputs["input_ids"].clone()
    first = int((input_ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    input_ids[0, first] = 5
    with flashvlm.prune(model, budget=4) as pruner:
        with pytest.raises(FlashVLMError, match="image placeholder tokens"):
            pruner.prune_inputs(dict(inputs, input_ids=input_ids))


@dataclass
class _NeedsClsRow(TokenSelector):
    name: ClassVar[str] = "needs_cls_row"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention"})

    def select(self, inputs, num_keep):
        return inputs.saliency.argsort(dim=-1, descending=True)[:, :num_keep]


@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if not case.video], ids=lambda case: case.name)
def test_a_method_needing_a_cls_row_says_when_the_encoder_has_none(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 1, 0)
    with flashvlm.prune(model, budget=4, method=_NeedsClsRow()) as pruner:
        if "cls_attention" not in case.lacks:  # CLIP towers have a CLS token
            pruner.prune_inputs(dict(inputs))
        else:
            with pytest.raises(MethodUnavailableError, match="needs cls_attention"):
                pruner.prune_inputs(dict(inputs))


@dataclass
class _RecordsText(TokenSelector):
    """Keeps the first tokens and records how many text tokens guided each unit."""

    name: ClassVar[str] = "records_text"
    requires: ClassVar[frozenset[str]] = frozenset({"text"})
    seen: ClassVar[list[int]] = []

    def select(self, inputs, num_keep):
        _RecordsText.seen += inputs.text_mask.sum(dim=1).tolist()
        return torch.arange(num_keep).expand(inputs.batch_size, num_keep)


@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_the_whole_prompt_text_guides_every_unit(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    _RecordsText.seen = []
    with flashvlm.prune(model, budget=2, method=_RecordsText()) as pruner:
        records = pruner.prune_inputs(dict(inputs)).images
    # Every real token that is no placeholder: text before and after the images, padding excluded.
    text_per_row = inputs["attention_mask"].sum(dim=1) - placeholder_counts(model, inputs["input_ids"])
    # An AnyRes image is selected as two units (base view and crops) under one budget.
    units_per_record = [2 if is_anyres(case) and record.kind == "image" else 1 for record in records]
    expected = [
        int(text_per_row[record.batch_index]) for record, units in zip(records, units_per_record) for _ in range(units)
    ]
    assert sorted(_RecordsText.seen) == sorted(expected)


@dataclass
class _UsesEverything(TokenSelector):
    """Needs every input an adapter can give (except a CLS row) and checks their shapes."""

    name: ClassVar[str] = "uses_everything"
    requires: ClassVar[frozenset[str]] = frozenset({"saliency", "text", "projected", "keys"})

    def select(self, inputs, num_keep):
        batch, tokens = inputs.batch_size, inputs.num_tokens
        assert inputs.saliency.shape == (batch, tokens) and inputs.keys.shape[:2] == (batch, tokens)
        assert inputs.projected.shape[:2] == (batch, tokens) and inputs.text_embeds.shape[0] == batch
        assert inputs.key_heads > 1 and inputs.keys.shape[-1] % inputs.key_heads == 0  # keys split into heads
        score = inputs.saliency + inputs.keys.float().norm(dim=-1)
        return score.argsort(dim=-1, descending=True)[:, :num_keep]


@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_every_input_a_method_may_ask_for_is_served(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    with flashvlm.prune(model, budget=3, method=_UsesEverything()) as pruner:
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert all(record.num_kept == 3 for record in pruner.last.images)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1


# -- lm_attention (FastV's input) ----------------------------------------------------------------
@dataclass
class _RecordsLmAttention(FastV):
    """FastV that records each unit's tokens (projected) with the lm_attention it is given."""

    name: ClassVar[str] = "records_lm_attention"
    requires: ClassVar[frozenset[str]] = frozenset({"lm_attention", "projected"})
    seen: ClassVar[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def select(self, inputs, num_keep):
        _RecordsLmAttention.seen.append((inputs.projected.flatten(0, 1), inputs.lm_attention.flatten()))
        return super().select(inputs, num_keep)


@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_lm_attention_is_the_eager_attention_row_at_each_selectable_token(case):
    model = tiny_model(case)
    eager = case.build()
    eager.set_attn_implementation("eager")
    inputs = case.make_inputs(model, 2, 0)
    embeds = []
    hook = eager.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: embeds.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    # Qwen computes its M-RoPE positions itself; the others get generate's (count of real tokens).
    positions = None if is_qwen(case) else (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            attentions = eager(**inputs, position_ids=positions, output_attentions=True).attentions
    finally:
        hook.remove()
    _RecordsLmAttention.seen = []
    with flashvlm.prune(model, budget=2, method=_RecordsLmAttention(layer=2)), torch.no_grad():
        model(**inputs)
    last_row = attentions[1][:, :, -1].mean(dim=1)  # (B, L): left padding, the last token is real
    is_selectable = visual_placeholders(model, inputs["input_ids"])
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:  # newline tokens are scored too, but are no unit's tokens
        is_selectable &= ~(embeds[0] == newline).all(dim=-1)
    expected_tokens, expected = embeds[0][is_selectable], last_row[is_selectable]  # (T, D), (T,)
    tokens, scores = (torch.cat(parts) for parts in zip(*_RecordsLmAttention.seen))
    # Each unit token is found where the model placed it, and carries that position's attention.
    places = torch.cdist(tokens, expected_tokens).argmin(dim=1)
    assert places.sort().values.tolist() == list(range(expected.numel()))
    torch.testing.assert_close(scores, expected[places], atol=1e-6, rtol=1e-4)


def test_a_training_model_gets_gradients_through_the_vision_side():
    model = build_tiny_llava(seed=3).train()
    inputs = llava_batch(model, 2)
    with flashvlm.prune(model, budget=8, method="flashvlm"):
        model(**inputs).logits.sum().backward()
    projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
    tower_grad = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad
    assert projector_grad is not None and tower_grad is not None and bool(tower_grad.abs().sum() > 0)
    with torch.no_grad(), flashvlm.prune(model.eval(), budget=8) as pruner:
        pruner.prune_inputs(dict(inputs))
    assert not pruner.last.model_kwargs["mm_encoder_outputs"]["image"].pooler_output[0].requires_grad
