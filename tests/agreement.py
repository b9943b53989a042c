"""Whether two code paths made the same selection, as far as that is well-defined.

Two paths that compute the vision features with different kernels (vLLM's and
transformers', a batch and a single row, TP = 2 and TP = 1) agree only to the last bits of
a float. A method whose choices hinge on near-ties (a top-k at the K-th score, a greedy DPP,
rounds of bipartite removal, where one flip changes every later round) can then keep other
tokens, and which ones depends on the CPU: a 1e-6 perturbation of the demo model's inputs
changes up to 7 of FlashVLM's 28 kept tokens. So an exact comparison of kept indices
across paths is a statement about the machine, not about the code. What is well-defined,
and what :func:`check_same_selection` asserts for each image (or view):

1. **The inputs agree.** Every input the method reads (features, saliency, projected
   tokens, keys, the text, the LM's attention) is the same tensor on both paths within
   ``tolerance`` of its largest value, with equal shapes and text mask. A wrong image, a
   wrong layer, a wrong text mode or a dropped view fails here, by orders of magnitude.
2. **Each path kept exactly what the method keeps on its own inputs.** The recorded call is
   replayed: same function, bit-equal inputs, so this is exact on every machine. A path
   that ran the method with other parameters or another budget fails here.

Given 1 and 2, the kept sets can differ only because the inputs' last bits did; the
number of swapped tokens is logged (:data:`SWAPS`, printed in the test summary). What
follows the selection is then compared exactly all the same: the reference path is run
again with the other path's kept indices forced (:class:`ForcedSelection`), so positions,
merging and the language model are checked whatever the selection's near-ties did.

:class:`SelectionRecorder` wraps a method to record every call; with
``FLASHVLM_TEST_PERTURBATION`` set (e.g. ``1e-6``) it perturbs one path's inputs at the
last-bit scale, and the suite must pass that way too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

#: The relative perturbation the recorder applies to the float inputs of every call it
#: records, when set (a test-only switch; 0 or unset: none).
PERTURBATION_VARIABLE = "FLASHVLM_TEST_PERTURBATION"
#: Fields perturbed: the float tensors a method reads from the vision side.
VISION_FIELDS = ("features", "saliency", "projected", "keys")
#: Fields compared (besides the text): those, and the language model's attention (FastV).
COMPARED_FIELDS = (*VISION_FIELDS, "lm_attention")
#: Inputs agree when they differ by at most this share of their largest magnitude. The paths
#: compared run the same fp32 arithmetic in different orders: they differ around 1e-6; a
#: different image, layer or text differs by 1e-1 and more.
DEFAULT_TOLERANCE = 1e-3


def perturbation_from_environment() -> float:
    value = os.environ.get(PERTURBATION_VARIABLE, "").strip()
    return float(value) if value else 0.0


@dataclass(eq=False)  # compared by identity: they hold tensors
class RecordedCall:
    """One call of a method: its inputs (on the CPU), its budget and the indices it kept (B, K)."""

    inputs: object  # SelectionInputs
    budget: object
    kept: torch.Tensor

    def row(self, index: int) -> RecordedRow:
        return RecordedRow(self, index)


@dataclass(eq=False)
class RecordedRow:
    """Row ``index`` of a recorded call: one image (or one view of an image)."""

    call: RecordedCall
    index: int

    @property
    def kept(self) -> list[int]:
        return self.call.kept[self.index].tolist()

    def field(self, name: str) -> torch.Tensor | None:
        value = getattr(self.call.inputs, name)
        return None if value is None else value[self.index]

    def text(self) -> torch.Tensor | None:
        """(L, D): the embeddings of the text tokens that guide the method: real text (padding
        dropped), and only the text before the image where the path says which that is."""
        inputs = self.call.inputs
        if inputs.text_embeds is None:
            return None
        mask = inputs.text_mask[self.index]
        if inputs.text_before_image is not None:
            mask = mask & inputs.text_before_image[self.index]
        return inputs.text_embeds[self.index][mask]


class SelectionRecorder:
    """A method that records each call's inputs and kept indices (and perturbs the inputs
    first when ``perturbation`` > 0). Everything else is the wrapped method's."""

    def __init__(self, selector, perturbation: float = 0.0, seed: int = 0) -> None:
        self.selector = selector
        self.perturbation = perturbation
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[RecordedCall] = []

    def __getattr__(self, name: str):
        return getattr(self.selector, name)

    def __call__(self, inputs, budget):
        if self.perturbation:
            inputs = perturbed(inputs, self.perturbation, self.generator)
        selection = self.selector(inputs, budget)
        self.calls.append(RecordedCall(snapshot(inputs), budget, selection.indices.detach().cpu()))
        return selection

    def sharing(self, selector) -> SelectionRecorder:
        """A recorder of another method whose calls go to this recorder's list (a vLLM request's own method)."""
        other = SelectionRecorder(selector, self.perturbation)
        other.generator, other.calls = self.generator, self.calls
        return other

    def second_path(self) -> None:
        """Start recording the other path of a comparison: forget the calls so far, and from now
        on perturb the inputs when ``FLASHVLM_TEST_PERTURBATION`` is set (the paths' features
        then differ in their last bits, as on a machine whose kernels round differently)."""
        self.calls = []
        self.perturbation = perturbation_from_environment()

    def rows(self) -> list[RecordedRow]:
        """Every recorded row, call by call."""
        return rows_of(self.calls)


def snapshot(inputs):
    """A CPU copy of ``inputs`` (SelectionInputs) that later calls cannot change."""
    copied = {}
    for field in dataclasses.fields(inputs):
        value = getattr(inputs, field.name)
        copied[field.name] = value.detach().cpu().clone() if torch.is_tensor(value) else value
    return type(inputs)(**copied)


def perturbed(inputs, scale: float, generator: torch.Generator):
    """``inputs`` with each vision-side float tensor x replaced by x * (1 + scale * noise)."""
    changes = {}
    for name in VISION_FIELDS:
        value = getattr(inputs, name)
        if value is not None and value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
            changes[name] = value * (1 + scale * noise)
    return dataclasses.replace(inputs, **changes)


#: The inputs each requirement of a method names (features are always read).
READ_FIELDS = {
    "saliency": "saliency",
    "cls_attention": "saliency",
    "release_saliency": "saliency",
    "projected": "projected",
    "keys": "keys",
    "text": "text",
    "lm_attention": "lm_attention",
}


def inputs_differ(
    ours: RecordedRow, reference: RecordedRow, requires: frozenset[str], tolerance: float = DEFAULT_TOLERANCE
) -> str | None:
    """Why the two rows' inputs that a method with ``requires`` reads differ beyond
    ``tolerance`` (relative to the largest value), or None when they agree. (A path may
    hand over more than the method reads; that is not compared.)"""
    read = {"features"} | {READ_FIELDS[need] for need in requires if need in READ_FIELDS}
    pairs = [(name, ours.field(name), reference.field(name)) for name in COMPARED_FIELDS if name in read]
    if "text" in read:
        pairs.append(("text", ours.text(), reference.text()))
    for name, a, b in pairs:
        if (a is None) != (b is None):
            return f"{name}: present on one path only"
        if a is None:
            continue
        if a.shape != b.shape:
            return f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
        gap = _relative_gap(a, b)
        if gap > tolerance:
            return f"{name}: differs by {gap:.2e} of its largest value (tolerance {tolerance:.0e})"
    return None


def replays_exactly(row: RecordedRow, method) -> bool:
    """Whether ``method`` keeps exactly the recorded indices on the recorded inputs."""
    call = row.call
    return torch.equal(method(call.inputs, call.budget).indices[row.index].cpu(), call.kept[row.index])


def kept_under_perturbation(row: RecordedRow, method, scale: float, seed: int = 0) -> bool:
    """Whether ``method`` keeps the recorded indices when the row's vision inputs are perturbed at
    relative ``scale``: a selection that sits on no near-tie at that scale, so that a path whose
    inputs differ far less (another engine's kernels) keeps the same tokens."""
    call = row.call
    inputs = perturbed(call.inputs, scale, torch.Generator().manual_seed(seed))
    return torch.equal(method(inputs, call.budget).indices[row.index].cpu(), call.kept[row.index])


def check_same_selection(
    ours: RecordedRow, reference: RecordedRow, method, *, tolerance: float = DEFAULT_TOLERANCE
) -> int:
    """Assert 1 and 2 of the module docstring for one image; return how many tokens were
    swapped. ``method`` is a fresh instance of the method both paths ran."""
    reason = inputs_differ(ours, reference, method.requires, tolerance)
    assert reason is None, f"the two paths handed the method different inputs: {reason}"
    if ours.kept == reference.kept:
        return 0
    assert len(ours.kept) == len(reference.kept), f"kept {len(ours.kept)} tokens against {len(reference.kept)}"
    for name, row in (("ours", ours), ("reference", reference)):
        assert replays_exactly(row, method), f"{name}: the method keeps other tokens on the recorded inputs"
    return len(set(ours.kept) - set(reference.kept))


class ForcedSelection:
    """A method whose calls keep given indices: the other path's choice, replayed on this
    path. ``indices`` holds one (B, K) tensor per call, in call order; a method that merges
    tokens (returns features) cannot be forced this way, and is refused."""

    def __init__(self, selector, indices: list[torch.Tensor]) -> None:
        self.selector, self.indices = selector, list(indices)

    def __getattr__(self, name: str):
        return getattr(self.selector, name)

    def __call__(self, inputs, budget):
        own = self.selector(inputs, budget)
        if own.features is not None:
            raise MergedTokensError(f"{self.selector.name} merges tokens: its choice cannot be forced")
        return dataclasses.replace(own, indices=self.indices.pop(0).to(own.indices.device))


class MergedTokensError(Exception):
    """A method's merged tokens depend on its own inputs, so another path's choice cannot be forced."""


def forced_indices(pairs: list[tuple[RecordedRow, RecordedRow]]) -> list[torch.Tensor]:
    """For each reference call (in order), its (B, K) indices with every row replaced by the
    kept indices of the row paired with it (``pairs``: (ours, reference) from :func:`match_rows`)."""
    replaced = {(id(reference.call), reference.index): ours.kept for ours, reference in pairs}
    calls = list({id(reference.call): reference.call for _, reference in pairs}.values())
    return [
        torch.tensor([replaced.get((id(call), row), call.kept[row].tolist()) for row in range(call.kept.shape[0])])
        for call in calls
    ]


def rows_of(calls: list[RecordedCall]) -> list[RecordedRow]:
    """Every row of the calls, call by call."""
    return [call.row(index) for call in calls for index in range(call.kept.shape[0])]


#: (label, tokens swapped, tokens kept) of every check made in this session, for the summary.
SWAPS: list[tuple[str, int, int]] = []


def compare_paths(
    ours: list[RecordedRow], reference: list[RecordedRow], method_name: str, label: str, every: bool = True
) -> tuple[int, list[tuple[RecordedRow, RecordedRow]]]:
    """:func:`check_same_selection` for each reference row against its match in ``ours``
    (``every``: both hold the same selections; else ``ours`` may hold more, as a batch holds
    other requests'). Returns (tokens swapped, the (ours, reference) pairs) and logs the swaps."""
    from flashvlm import get_method

    pairs = match_rows(ours, reference, every)
    swaps = sum(check_same_selection(row, other, get_method(method_name)) for row, other in pairs)
    SWAPS.append((label, swaps, sum(len(other.kept) for other in reference)))
    return swaps, pairs


def reference_on_our_choice(ours: list[RecordedRow], run_reference, method_name: str, label: str, every: bool = True):
    """The reference path's result for a request whose selections ``ours`` made, checked as the
    module docstring says: ``run_reference(forced)`` runs the reference path (forced: None, or
    :func:`forced_indices` to replay) and returns a dict whose ``"rows"`` are its recorded rows.
    Where near-ties made the kept tokens differ, the reference runs again on our choice, so
    everything after the selection compares exactly. None where a merging method's choice
    cannot be forced (``every``: as in :func:`compare_paths`)."""
    reference = run_reference(None)
    swaps, pairs = compare_paths(ours, reference["rows"], method_name, label, every)
    if swaps == 0:
        return reference
    try:
        return run_reference(forced_indices(pairs))
    except MergedTokensError:
        return None


def alone_as_in_batch(pruner, recorder: SelectionRecorder, batch: list[RecordedRow], method_name: str, label: str, run):
    """``run()`` (one request alone, through ``pruner`` whose selector is ``recorder``), its
    selections checked against the batch's (``batch``: every request's rows); where near-ties
    made them differ, ``run()`` again with the batch's kept indices forced, so its result is
    what the batch's row must be. None where a merging method's choice cannot be forced."""
    recorder.second_path()
    result = run()
    swaps, pairs = compare_paths(batch, recorder.rows(), method_name, label, every=False)
    if swaps:
        pruner.selector = ForcedSelection(recorder.selector, forced_indices(pairs))
        try:
            result = run()
        except MergedTokensError:
            result = None
        finally:
            pruner.selector = recorder
    return result


def match_rows(
    ours: list[RecordedRow], reference: list[RecordedRow], every: bool = True
) -> list[tuple[RecordedRow, RecordedRow]]:
    """Pair each reference row with the row of ours of the same token count and budget whose
    inputs (features and text) are nearest: paths may order or batch an image's views, or
    a batch's images, differently. ``every``: both lists hold the same selections (else
    ``ours`` may hold more, as a batch holds other requests' images). Returns (ours, reference)."""
    if every:
        assert len(ours) == len(reference), f"{len(ours)} selections against {len(reference)}"
    left = list(ours)
    pairs = []
    for row in reference:
        candidates = [
            other
            for other in left
            if other.field("features").shape == row.field("features").shape and other.call.budget == row.call.budget
        ]
        assert candidates, f"no selection of {row.field('features').shape[0]} tokens at budget {row.call.budget}"
        best = min(candidates, key=lambda other: _distance(row, other))
        left.remove(best)
        pairs.append((best, row))
    return pairs


def _distance(row: RecordedRow, other: RecordedRow) -> float:
    """How far apart two rows' inputs are: the features' and the text's relative gaps, added
    (one image asked two questions differs in its text only, two images in their features)."""
    text, other_text = row.text(), other.text()
    if (text is None) != (other_text is None) or (text is not None and text.shape != other_text.shape):
        return float("inf")
    gap = _relative_gap(row.field("features"), other.field("features"))
    return gap if text is None else gap + _relative_gap(text, other_text)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((a.float() - b.float()).abs().max() / scale).item()


# -- inside a vLLM engine (tests/vllm_plugin/vllm_job.py, through LLM.apply_model) ---------------------
# Module-level functions, so that vLLM's worker processes can unpickle them by name.


def start_recording(model) -> bool:
    """Wrap a pruned vLLM model's method in a recorder, and each request's own method in one
    that records into the same list (False: the model is stock)."""
    settings = getattr(model, "flashvlm", None)
    if settings is None:
        return False
    recorder = SelectionRecorder(settings.selector, perturbation_from_environment())
    model.flashvlm = dataclasses.replace(settings, selector=recorder)
    request_settings = model.flashvlm_request_settings

    def recorded_request_settings(text: str):
        request = request_settings(text)
        return dataclasses.replace(request, selector=recorder.sharing(request.selector))

    model.flashvlm_request_settings = recorded_request_settings
    return True


def take_recorded_calls(model) -> list[dict]:
    """The calls a vLLM model's recorder saw since the last take (empty for a stock model), as
    plain dicts of tensors and numbers (:func:`call_from_plain` rebuilds them): vLLM's
    messages between processes carry those, not this module's classes."""
    recorder = getattr(getattr(model, "flashvlm", None), "selector", None)
    if not isinstance(recorder, SelectionRecorder):
        return []
    calls = list(recorder.calls)
    recorder.calls.clear()  # in place: the requests' recorders share the list
    return [
        {
            "inputs": {field.name: getattr(call.inputs, field.name) for field in dataclasses.fields(call.inputs)},
            "budget": call.budget,
            "kept": call.kept,
        }
        for call in calls
    ]


def call_from_plain(plain: dict) -> RecordedCall:
    """A :class:`RecordedCall` from :func:`take_recorded_calls`' form, with tensors of its own."""
    from flashvlm import SelectionInputs

    fields = {name: value.clone() if torch.is_tensor(value) else value for name, value in plain["inputs"].items()}
    if fields.get("grid_shape") is not None:
        fields["grid_shape"] = tuple(fields["grid_shape"])
    return RecordedCall(SelectionInputs(**fields), plain["budget"], torch.as_tensor(plain["kept"]).clone())
