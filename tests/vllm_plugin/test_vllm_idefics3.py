"""The plug-in on tiny random Idefics3 and SmolVLM models against Hugging Face + flashvlm.

The images: 64 x 64 and 32 x 32 ones, each resized to 64 px and split 2 x 2 into 32 px
sub-images plus the global view (16 tokens each after the pixel shuffle: 80). Both are square,
so no sub-image has padding patches: vLLM's Idefics3 tower does not mask them, transformers' does.
vLLM lays out a run per sub-image, so each keeps its share of K: transformers runs with
``tile_budget="per_tile"``. Each selection must agree with ``flashvlm.prune`` on the
transformers model as tests/agreement.py defines it; then the kept indices, greedy tokens,
log-probabilities and prompt length must equal transformers run on the tokens vLLM kept.
"""

from __future__ import annotations

import pytest
import torch
from families.idefics3 import IDEFICS3_CHAT_TEMPLATE
from families.shared import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TILE_SIZE,
    TILED_VOCAB_SIZE,
    TOKENS_PER_TILE,
    fixed_id_tokenizer,
    served_text_config,
    tiny_vision_config,
)
from test_vllm_llava import (
    MAX_TOKENS,
    only_output,
    recorded_rows,
    with_settings,
)
from tiled_checks import check_batch, check_image, check_plugin_off, check_second_question
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig
from vllm_harness import run_stock_and_plugin

from flashvlm.loading import chat_prompt

QUESTIONS = ["what is the color of the shape ?", "how many red circle ?"]
#: Side of each (square) image, and its tokens: four sub-images and the global view.
IMAGE_SIDES = [64, 32]
IMAGE_TOKENS = [5 * TOKENS_PER_TILE, 5 * TOKENS_PER_TILE]
#: Two budgets, the engine's and a request's own: 12 of 80 keeps 2 per sub-image and 4 of the
#: global view; 6 keeps 1 per sub-image and 2.
BUDGETS = (12, 6)
#: Methods with other paths, as requests' own, at the first budget on the first image: DivPrune reads the
#: features alone; pool reads each view as its own raster. (VisionZip and VisPruner read a CLS
#: row, which SigLIP lacks: refused, below.)
OTHER_METHODS = ("divprune", "pool")
PER_TILE = {"tile_budget": "per_tile"}


def build_model(model_type: str):
    from transformers import Idefics3Config, Idefics3VisionConfig, SmolVLMConfig, SmolVLMVisionConfig

    config_class, vision_class = {
        "idefics3": (Idefics3Config, Idefics3VisionConfig),
        "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig),
    }[model_type]
    config = config_class(
        vision_config=tiny_vision_config(vision_class, TILE_SIZE),
        text_config=served_text_config(LlamaConfig, vocab_size=TILED_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        pad_token_id=PAD_TOKEN_ID,
    )
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def save_processor(folder, model_type: str) -> None:
    """Idefics3Processor (or SmolVLMProcessor, with its video processor: the vLLM environment
    has torchvision's Python parts): images split into 32 px sub-images, at most 2 x 2."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, SmolVLMImageProcessorPil, SmolVLMProcessor

    tokenizer = fixed_id_tokenizer(
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    sizes = dict(size={"longest_edge": 2 * TILE_SIZE}, max_image_size={"longest_edge": TILE_SIZE})
    common = dict(tokenizer=tokenizer, image_seq_len=TOKENS_PER_TILE, chat_template=IDEFICS3_CHAT_TEMPLATE)
    if model_type == "idefics3":
        processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**sizes), **common)
    else:
        from transformers import SmolVLMVideoProcessor

        video = SmolVLMVideoProcessor(**sizes)
        processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**sizes), video_processor=video, **common)
    processor.save_pretrained(folder)


def make_folders(root, model_type: str) -> dict:
    from PIL import Image

    folder = root / model_type
    build_model(model_type).save_pretrained(folder)
    save_processor(folder, model_type)
    generator = torch.Generator().manual_seed(0)
    images = []
    for side in IMAGE_SIDES:
        pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        images.append(str(root / f"{model_type}-{side}.png"))
        Image.fromarray(pixels.numpy()).save(images[-1])
    return {"model": folder, "images": images, "root": root}


def load_hf(folders: dict):
    model = AutoModelForImageTextToText.from_pretrained(folders["model"]).eval()
    return model, AutoProcessor.from_pretrained(folders["model"])


def requests_for(processor, images: list[str]) -> list[dict]:
    return [
        {"prompt": chat_prompt(processor, question), "images": [image]} for question, image in zip(QUESTIONS, images)
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("vllm-idefics3"), "idefics3")


@pytest.fixture(scope="module")
def hf_model(folders):
    return load_hf(folders)


@pytest.fixture(scope="module")
def runs(folders, hf_model):
    _, processor = hf_model
    images = requests_for(processor, folders["images"])
    first, second = BUDGETS
    # One pruned engine at the first budget; the second budget and the other methods come as
    # requests' own settings (each its own selection: the settings are in the cache key).
    calls = {
        **{f"image{index}": request for index, request in enumerate(images)},
        # The first image again, asked the other question: its tower output is reused.
        "again": {**images[0], "prompt": chat_prompt(processor, QUESTIONS[1])},
        **{
            f"image{index}@{second}": with_settings(request, {"budget": second}) for index, request in enumerate(images)
        },
        **{method: with_settings(images[0], {"budget": first, "method": method}) for method in OTHER_METHODS},
    }
    one_by_one = [[request] for request in images]
    plugin_engines = [
        {"name": "off", "calls": one_by_one},
        {"name": "pruned", "hf_overrides": {"flashvlm": {"budget": first}}, "calls": [[c] for c in calls.values()]},
        # Both images in one batch, on an engine of its own (the other's encoder cache holds them).
        {"name": "batch", "hf_overrides": {"flashvlm": {"budget": first}}, "calls": [images]},
    ]
    job = {
        "model": str(folders["model"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "engine_args": {"limit_mm_per_prompt": {"image": 1}},
    }
    stock_engines = [{"name": "stock", "calls": one_by_one}]
    stock, plugin = run_stock_and_plugin(job, stock_engines, plugin_engines, folders["root"] / "jobs")
    at = {name: place for place, name in enumerate(calls)}
    return {"stock": stock["stock"], "plugin": plugin, "images": images, "calls": calls, "at": at}


def check_budget(runs, hf_model, budget) -> None:
    for index, tokens in enumerate(IMAGE_TOKENS):
        name = f"image{index}" if budget == BUDGETS[0] else f"image{index}@{budget}"
        call = check_image(runs, hf_model, name, budget, **PER_TILE)
        ((_, num_tokens, kept),) = call["kept"]
        assert num_tokens == tokens and len(kept) == min(budget, tokens)
        stock = only_output(runs["stock"][index])
        # The markers and line breaks stay: the prompt loses the dropped tokens only.
        assert only_output(call)["prompt_length"] == stock["prompt_length"] - tokens + len(kept)


def test_plugin_off_is_stock_vllm_and_equals_transformers(runs, hf_model):
    check_plugin_off(runs, hf_model, runs["images"])


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_image_keeps_what_transformers_keeps_per_tile(runs, hf_model, budget):
    check_budget(runs, hf_model, budget)


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_keep_what_they_keep_in_transformers(runs, hf_model, method):
    check_image(runs, hf_model, method, BUDGETS[0], method, **PER_TILE)


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_methods_that_read_a_cls_row_are_refused_at_start_up(method):
    from types import SimpleNamespace

    from flashvlm.errors import MethodUnavailableError
    from flashvlm.integrations.vllm.idefics3 import IDEFICS3_SERVED_REQUIREMENTS
    from flashvlm.integrations.vllm.settings import settings_of

    config = SimpleNamespace(flashvlm={"method": method, "budget": 8})
    with pytest.raises(MethodUnavailableError, match=r"needs cls_attention \(the CLS token's attention row"):
        settings_of(config, IDEFICS3_SERVED_REQUIREMENTS)


def test_a_batch_equals_the_requests_one_by_one(runs, hf_model):
    check_batch(runs, hf_model, BUDGETS[0], **PER_TILE)


def test_a_second_question_reuses_the_images_tower_output(runs, hf_model):
    check_second_question(runs, hf_model, BUDGETS[0], **PER_TILE)


def transformers_selection(hf_model, request: dict, budget, forced: list | None = None) -> dict:
    """What ``flashvlm.prune(..., tile_budget="per_tile")`` keeps for one request, without
    generating: kept indices, the pruned prompt's length and the method's recorded rows
    (``forced``: kept indices replayed). The vLLM environment's transformers (5.19) cannot run a
    pruned SmolVLM: its merger takes whole sub-images only (transformers 5.20 on can)."""
    from agreement import ForcedSelection, SelectionRecorder
    from PIL import Image

    import flashvlm

    model, processor = hf_model
    images = [Image.open(path).convert("RGB") for path in request["images"]]
    inputs = processor(images=images, text=request["prompt"], return_tensors="pt")
    with flashvlm.prune(model, budget=budget, tile_budget="per_tile") as pruner:
        selector = pruner.selector if forced is None else ForcedSelection(pruner.selector, forced)
        pruner.selector = recorder = SelectionRecorder(selector)
        pruned = pruner.prune_inputs(dict(inputs))
    kept = [image.keep_indices.tolist() for image in pruned.images]
    return {"kept": kept, "prompt_length": pruned.pruned_length, "rows": recorder.rows()}


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """SmolVLM (vLLM's Idefics3 subclass, SmolVLMProcessor): unpruned and at the first budget."""
    folders = make_folders(tmp_path_factory.mktemp("vllm-smolvlm"), "smolvlm")
    hf_model = load_hf(folders)
    images = requests_for(hf_model[1], folders["images"])
    one_by_one = [[request] for request in images]
    plugin_engines = [
        {"name": "off", "calls": one_by_one},
        {"name": f"b{BUDGETS[0]}", "hf_overrides": {"flashvlm": {"budget": BUDGETS[0]}}, "calls": one_by_one},
    ]
    job = {
        "model": str(folders["model"]),
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "engine_args": {"limit_mm_per_prompt": {"image": 1}},
    }
    stock, plugin = run_stock_and_plugin(job, [{"name": "stock", "calls": one_by_one}], plugin_engines, folders["root"])
    return {"stock": stock["stock"], "plugin": plugin, "images": images}, hf_model


def test_smolvlm_off_is_stock_and_keeps_what_transformers_keeps_per_tile(smolvlm):
    from agreement import reference_on_our_choice

    runs, hf_model = smolvlm
    check_plugin_off(runs, hf_model, runs["images"])
    engine, budget = f"b{BUDGETS[0]}", BUDGETS[0]
    for index, (request, tokens) in enumerate(zip(runs["images"], IMAGE_TOKENS)):
        call, vllm_rows = runs["plugin"][engine][index], recorded_rows(runs["plugin"]["selections"], engine, index)
        label = f"vLLM SmolVLM at {budget} vs transformers: {request['prompt'][-40:]!r}"
        reference = reference_on_our_choice(
            vllm_rows,
            lambda forced, request=request: transformers_selection(hf_model, request, budget, forced),
            "flashvlm",
            label,
        )
        ((_, num_tokens, kept),) = call["kept"]
        assert [kept] == reference["kept"] and num_tokens == tokens
        assert only_output(call)["prompt_length"] == reference["prompt_length"]
