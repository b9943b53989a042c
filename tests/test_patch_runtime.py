"""Attaching and calling at run time: compiled models, cache continuation, ``pruner.last``,
training through the kept tokens, and method parameters."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from families import ADAPTER_TEST_CASES, case_named
from families.llava import build_tiny_llava, llava_batch
from families.shared import IMAGE_TOKEN_ID

import flashvlm
from flashvlm.errors import FlashVLMError
from flashvlm.selection import get_method


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava(seed=5)


def text_only(inputs: dict) -> dict:
    """The batch's prompts with their image placeholders turned into ordinary text tokens."""
    input_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, 9)
    return dict(input_ids=input_ids, attention_mask=inputs["attention_mask"])


def test_a_torch_compile_wrapper_is_pruned_through_the_module_it_compiles(model):
    inputs = llava_batch(model, batch_size=2, seed=3)
    settings = dict(max_new_tokens=3, do_sample=False)
    with flashvlm.prune(model, budget=4), torch.no_grad():
        expected = model.generate(**inputs, **settings)
    # The eager backend wraps without compiling code: the test checks the wiring, not inductor.
    compiled = torch.compile(model, backend="eager")
    pruner = flashvlm.apply(compiled, budget=4)
    try:
        assert pruner.model is model
        with torch.no_grad():
            output = compiled.generate(**inputs, **settings)
        assert torch.equal(output, expected)
        assert pruner.last.images[0].num_kept == 4
    finally:
        flashvlm.remove(compiled)
    assert "generate" not in vars(model) and not hasattr(model, "_flashvlm_pruner")


def test_continuing_from_a_pruned_cache_is_refused(model):
    inputs = llava_batch(model, batch_size=1, seed=6)
    settings = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    with flashvlm.prune(model, budget=4), torch.no_grad():
        first = model.generate(**inputs, **settings)
        continued = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences))
        for name in ("cache", "past_key_values"):  # transformers' name and the deprecated one
            with pytest.raises(FlashVLMError, match="KV cache holds a pruned prompt"):
                model.generate(**continued, **{name: first.cache}, **settings)
        with pytest.raises(FlashVLMError, match="KV cache holds a pruned prompt"):
            model.generate(**continued, pixel_values=inputs["pixel_values"], cache=first.cache, **settings)


def test_a_pruned_cache_refuses_to_continue_after_the_pruner_is_removed(model):
    inputs = llava_batch(model, batch_size=1, seed=6)
    settings = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        with flashvlm.prune(model, budget=4):
            first = model.generate(**inputs, **settings)
            forward_cache = model(**inputs, use_cache=True).past_key_values  # a pruned forward fills one too
        continued = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences))
        for cache in (first.cache, forward_cache):
            length = cache.get_seq_length()  # looking at the cache is fine; growing it is not
            with pytest.raises(FlashVLMError, match="KV cache holds a pruned prompt"):
                model.generate(**continued, cache=cache, **settings)
            with pytest.raises(FlashVLMError, match="KV cache holds a pruned prompt"):
                model(input_ids=first.sequences[:, -1:], cache=cache)
            assert cache.get_seq_length() == length
        # A cache the unpruned model fills continues as before.
        unpruned = model.generate(**inputs, **settings)
        continued = dict(input_ids=unpruned.sequences, attention_mask=torch.ones_like(unpruned.sequences))
        model.generate(**continued, cache=unpruned.cache, **settings)


def test_continuing_from_an_unpruned_cache_gives_the_unpruned_tokens(model):
    inputs = llava_batch(model, batch_size=1, seed=7)
    settings = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)

    def continue_from(first, attached: bool):
        # The images are in the cache already: a continuation passes only the ids, as without flashvlm.
        continued = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences))
        cache = copy.deepcopy(first.cache)
        if not attached:
            return model.generate(**continued, cache=cache, **settings).sequences
        with flashvlm.prune(model, budget=4):
            return model.generate(**continued, cache=cache, **settings).sequences

    with torch.no_grad():
        first = model.generate(**inputs, **settings)
        assert torch.equal(continue_from(first, attached=True), continue_from(first, attached=False))


def test_a_pruner_used_as_a_context_manager_attaches_and_detaches(model):
    inputs = llava_batch(model, batch_size=1, seed=9)
    with flashvlm.Pruner(model, 4) as pruner, torch.no_grad():  # ran the model unpruned, pruner.last None
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert pruner.last.images[0].num_kept == 4
    assert "generate" not in vars(model) and not hasattr(model, "_flashvlm_pruner")
    with flashvlm.apply(model, 4) as pruner:  # already attached: entering changes nothing
        assert model._flashvlm_pruner is pruner
        with pytest.raises(FlashVLMError, match="already has a flashvlm method attached"):
            flashvlm.Pruner(model, 8).__enter__()
    assert not hasattr(model, "_flashvlm_pruner")


def test_last_describes_no_image_after_a_text_only_call(model):
    inputs = llava_batch(model, batch_size=2, seed=8)
    with flashvlm.prune(model, budget=4, timed=True) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert pruner.last is not None and pruner.last_selection_seconds is not None
        model.generate(**text_only(inputs), max_new_tokens=2, do_sample=False)
        assert pruner.last is None and pruner.last_selection_seconds is None
        model(**inputs)
        assert pruner.last is not None
        model(**text_only(inputs))
        assert pruner.last is None


@pytest.mark.parametrize("method", ["flashvlm", "fastv"])  # fastv taps an LM layer other threads run through
def test_threads_sharing_a_pruner_get_their_own_answers_and_last(model, method):
    # Two threads generate through one pruner (one image, then two) from the same moment,
    # and neither reads `last` until both have finished: shared taps or a shared `last`
    # would give one of them the other's tensors.
    settings = dict(max_new_tokens=3, do_sample=False)
    batches = {size: llava_batch(model, batch_size=size, seed=size) for size in (1, 2)}

    def run(size: int, start: threading.Barrier, finished: threading.Barrier, seen: dict) -> None:
        start.wait(timeout=60)
        with torch.no_grad():
            output = model.generate(**batches[size], **settings)
        finished.wait(timeout=60)
        kept = [image.keep_indices for image in pruner.last.images]
        seen[size] = (output, kept, pruner.last_selection_seconds is not None)

    with flashvlm.prune(model, budget=4, method=method, timed=True) as pruner, torch.no_grad():
        expected = {}
        for size, inputs in batches.items():
            expected[size] = (model.generate(**inputs, **settings), [i.keep_indices for i in pruner.last.images])
        for _ in range(4):
            start, finished, seen = threading.Barrier(2), threading.Barrier(2), {}
            threads = [threading.Thread(target=run, args=(size, start, finished, seen)) for size in batches]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert sorted(seen) == [1, 2]
            for size, (output, kept, timed) in seen.items():
                assert torch.equal(output, expected[size][0]) and timed
                assert len(kept) == len(expected[size][1]) and all(map(torch.equal, kept, expected[size][1]))


def test_last_is_per_thread(model):
    with flashvlm.prune(model, budget=4) as pruner, torch.no_grad():
        model(**llava_batch(model, batch_size=1))
        other = []
        thread = threading.Thread(target=lambda: other.append(pruner.last))
        thread.start()
        thread.join(timeout=60)
        assert other == [None] and pruner.last is not None  # this thread's call, not the other's


@pytest.mark.parametrize("method", ["flashvlm:release", "flashvlm", "random"])
def test_an_unknown_method_parameter_is_named_with_the_accepted_ones(method):
    with pytest.raises(
        FlashVLMError, match=r"has no parameter\(s\) \['foo'\]; its parameters are \[.*'(text_weight|seed)'"
    ):
        get_method(method, foo=1)


def test_parameters_are_checked_on_instances_and_parameterless_methods():
    with pytest.raises(FlashVLMError, match=r"has no parameter\(s\) \['foo'\]; its parameters are \[.*'text_weight'"):
        get_method(flashvlm.FlashVLM(), foo=1)
    with pytest.raises(FlashVLMError, match=r"'none' has no parameter\(s\) \['foo'\]; it takes no parameters"):
        get_method("none", foo=1)
    assert get_method("flashvlm:release", text_weight=0.25).text_weight == 0.25


#: Parameters of the vision side: the tower's patch embedding and the projector (merger).
VISION_SIDE = ("patch_embed", "multi_modal_projector", "merger")


def vision_side_gradients(case, training: bool) -> dict[str, torch.Tensor | None]:
    """Gradient of every vision-side parameter after a pruned forward and backward of the LM loss."""
    model = case.build()  # its own copy: training mode and gradients must not reach the shared one
    inputs = case.make_inputs(model, 2, 0)
    model.train(training)
    with flashvlm.prune(model, budget=3):
        logits = model(**inputs).logits
    logits.float().logsumexp(dim=-1).mean().backward()
    return {name: param.grad for name, param in model.named_parameters() if any(part in name for part in VISION_SIDE)}


@pytest.mark.parametrize("case", [case for case in ADAPTER_TEST_CASES if not case.video], ids=lambda case: case.name)
def test_training_sends_gradients_to_the_tower_and_projector_through_the_kept_tokens(case):
    gradients = vision_side_gradients(case, training=True)
    assert gradients and all(grad is not None and bool(grad.abs().sum() > 0) for grad in gradients.values()), [
        name for name, grad in gradients.items() if grad is None or not bool(grad.abs().sum() > 0)
    ]


def test_inference_keeps_the_vision_side_out_of_the_graph():
    gradients = vision_side_gradients(case_named("llava"), training=False)
    assert gradients and all(grad is None for grad in gradients.values())


def test_one_options_object_is_validated_once_and_drives_the_pruner(model):
    options = flashvlm.PruneOptions.of(8, "flashvlm", text_weight=0.3)
    assert options.budget == 8 and options.selector.text_weight == 0.3
    with pytest.raises(FlashVLMError, match="video_budget"):
        flashvlm.PruneOptions.of(8, video_budget="per_minute")
    with pytest.raises(FlashVLMError, match="budget"):
        flashvlm.PruneOptions(0)
    pruner = flashvlm.Pruner(model, options)
    assert pruner.options is options and pruner.budget == 8 and pruner.selector is options.selector
