"""How often LLaVA-NeXT's two newline rules differ: a crop row that keeps no token loses its
newline under ``newlines="kept_rows"`` (the HF default) and keeps it under ``"every_row"``
(what vLLM needs, see docs/vllm.md).

    .venv/bin/python lab/newline_rules.py [--method flashvlm] [--out FILE.json]

The model is the shipped demo model (LLaVA-1.5: its trained CLIP tower, projector and LM)
put into LLaVA-NeXT's AnyRes form: pinpoints of 1 x 2, 2 x 1 and 2 x 2 tiles of 224 px, a
zero ``image_newline`` (the newline's value does not enter the selection). Each shipped
example scene, with its question, is resized to each size below (height x width), and pruned
at each budget. For every (image, budget) the script counts the crop rows that keep no token;
the rules differ on an image when that count is not 0. Writes a Markdown table to stdout
and, with ``--out``, the figures as JSON. About a minute on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from flashvlm import prune
from flashvlm.demo import EXAMPLES_DIR
from flashvlm.loading import chat_prompt

#: The small scene-trained LLaVA the tests keep (tests/scene_llava): real weights, loads in a second.
MODEL_DIR = Path(__file__).resolve().parents[1] / "tests" / "scene_llava"

TILE = 224
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
#: (height, width): square, wide, tall and two in between (unpadded rasters of other shapes).
SIZES = [(224, 224), (448, 448), (224, 448), (448, 224), (300, 500), (500, 360)]
BUDGETS = (0.5, 0.25, 0.1, 64, 32)


def demo_as_llava_next() -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """The demo model's weights in a LLaVA-NeXT of the same parts, and its processor."""
    llava = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
    config = LlavaNextConfig(
        vision_config=llava.config.vision_config,
        text_config=llava.config.text_config,
        image_token_id=llava.config.image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=llava.config.vision_feature_layer,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        projector_hidden_act=llava.config.projector_hidden_act,
        multimodal_projector_bias=llava.config.multimodal_projector_bias,
        pad_token_id=llava.config.pad_token_id,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
    assert missing == ["model.image_newline"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        model.model.image_newline.zero_()
    stock = AutoProcessor.from_pretrained(MODEL_DIR)
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=PINPOINTS,
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_mean=stock.image_processor.image_mean,
        image_std=stock.image_processor.image_std,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=stock.tokenizer,
        patch_size=stock.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=stock.chat_template,
    )
    return model, processor


def emptied_rows(model, processor, image: Image.Image, question: str, budget, method: str) -> tuple[int, int]:
    """(crop rows that keep no token, crop rows) of one image at one budget."""
    inputs = processor(images=image, text=chat_prompt(processor, question), return_tensors="pt")
    with torch.no_grad(), prune(model, budget, method) as pruner:
        pruned = pruner.prune_inputs(dict(inputs))
    (record,) = pruned.images
    base, crops = record.regions
    rows, cols = crops.grid_shape
    crop_rows_kept = set((crops.chosen // cols).tolist())  # chosen: places among the crops' tokens
    return rows - len(crop_rows_kept), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="flashvlm")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, processor = demo_as_llava_next()
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    started = time.perf_counter()
    rows_out = []
    for budget in BUDGETS:
        differ = images = emptied = total_rows = 0
        for example in examples:
            scene = Image.open(EXAMPLES_DIR / example["image"]).convert("RGB")
            for height, width in SIZES:
                lost, rows = emptied_rows(
                    model, processor, scene.resize((width, height)), example["question"], budget, args.method
                )
                images += 1
                differ += lost > 0
                emptied += lost
                total_rows += rows
        rows_out.append(
            {"budget": budget, "images": images, "images_differ": differ, "rows_emptied": emptied, "rows": total_rows}
        )
    print(f"method {args.method}, {len(examples)} scenes x {len(SIZES)} sizes, {time.perf_counter() - started:.0f} s\n")
    print("| budget | images where the rules differ | crop rows that keep no token |")
    print("|---|---|---|")
    for row in rows_out:
        share = 100 * row["images_differ"] / row["images"]
        print(
            f"| {row['budget']} | {row['images_differ']} of {row['images']} ({share:.0f} %) "
            f"| {row['rows_emptied']} of {row['rows']} ({100 * row['rows_emptied'] / row['rows']:.1f} %) |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"method": args.method, "sizes": SIZES, "rows": rows_out}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
