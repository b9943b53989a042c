"""Why text relevance does or does not find the queried object: numbers to read, not to train on.

    python -m lab diagnose --model runs/gpu/model --size 64

Prints, over validation questions:
- the norm of projected visual tokens against the norm of word embeddings, and the mean
  cosine between two visual tokens of one image (near 1 = a shared component dominates);
- which prompt words win FlashVLM's soft maximum over text tokens (share of the weight);
- the cosine of the queried object's tokens to the embedding of its colour and shape
  word, against the other objects' tokens;
- what the tokens say on their own: for each patch mostly covered by an object, whether the
  nearest colour word (of the five) and the nearest shape word (of the four) are the
  object's, SmolLM2's " red" form, as the grounding term trains them;
- whether the language model reads them: first-token accuracy on one-object scenes, where
  "what color is the square ?" needs no search, and "what shape is the red object ?".
"""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F

from flashvlm.demo.model import demo_model_folder
from flashvlm.loading import chat_prompt, load_model

from .scenes import COLORS, SHAPES, example_rng, make_example
from .splits import example_row, object_tokens, split_examples, target_indices
from .train import patch_classes, vision_hidden_states


def diagnose(model, processor, size: int = 64, seed: int = 0, temperature: float = 0.05) -> dict:
    embedding = model.get_input_embeddings()
    projector = model.model.multi_modal_projector
    tokenizer = processor.tokenizer
    image_id = model.config.image_token_id
    word_weight: Counter = Counter()
    visual_norms, word_norms, pairwise, queried_cos, other_cos = [], [], [], [], []
    first_token = lambda word: tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    color_words = F.normalize(embedding(torch.tensor([first_token(c) for c in COLORS])), dim=-1)  # (5, D)
    shape_words = F.normalize(embedding(torch.tensor([first_token(s) for s in SHAPES])), dim=-1)  # (4, D)
    color_hits, shape_hits = [], []
    for index, example in enumerate(split_examples("validation", size, seed)):
        inputs = processor(
            images=[example.render()], text=chat_prompt(processor, example.question), return_tensors="pt"
        )
        with torch.no_grad():
            features = vision_hidden_states(model, inputs["pixel_values"])[-1][:, 1:]  # (1, N, C), CLS dropped
            visual = projector(features)[0]  # (N, D)
            ids = inputs["input_ids"][0]
            text_ids = ids[ids != image_id]
            words = embedding(text_ids)  # (L, D)
        visual_norms.append(visual.norm(dim=-1).mean().item())
        word_norms.append(words.norm(dim=-1).mean().item())
        unit = F.normalize(visual, dim=-1)
        pairwise.append((unit @ unit.T).mean().item())
        similarity = unit @ F.normalize(words, dim=-1).T  # (N, L)
        weights = torch.softmax(similarity / temperature, dim=-1).mean(dim=0)  # (L,) mean over image tokens
        for token, weight in zip(tokenizer.convert_ids_to_tokens(text_ids.tolist()), weights.tolist()):
            word_weight[token] += weight / size
        labels = patch_classes(example.objects, coverage=0.5)  # each patch's owner: colour, shape + 1; 0 elsewhere
        on_object = labels["patch_shapes"] > 0
        color_hits += ((unit @ color_words.T).argmax(-1) + 1 == labels["patch_colors"])[on_object].tolist()
        shape_hits += ((unit @ shape_words.T).argmax(-1) + 1 == labels["patch_shapes"])[on_object].tolist()
        row = example_row(example, str(index), "")
        targets = target_indices(row)
        if example.family != "attribute" or not targets:
            continue
        for number, obj in enumerate(row["objects"]):
            # A word's first token stands for it (SmolLM2 splits "triangle" and "diamond" in two).
            attribute_ids = torch.tensor(
                [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (obj["color"], obj["shape"])]
            )
            attribute = F.normalize(embedding(attribute_ids), dim=-1)  # (2, D)
            cells = torch.tensor(object_tokens(obj["bbox"]))
            cosine = (unit[cells] @ attribute.T).max(dim=0).values.mean().item()
            (queried_cos if number in targets else other_cos).append(cosine)
    mean = lambda values: round(sum(values) / len(values), 4) if values else float("nan")  # noqa: E731
    return {
        "patch_nearest_word_accuracy": {
            "color": mean(color_hits),
            "shape": mean(shape_hits),
            "patches": len(color_hits),
        },
        "one_object_first_token_accuracy": one_object_reading(model, processor, size, seed),
        "visual_token_norm": mean(visual_norms),
        "word_embedding_norm": mean(word_norms),
        "mean_cosine_between_visual_tokens": mean(pairwise),
        "top_words_in_text_softmax": {w: round(v, 3) for w, v in word_weight.most_common(6)},
        "object_to_own_attribute_words_cosine": {"queried": mean(queried_cos), "others": mean(other_cos)},
    }


def one_object_reading(model, processor, size: int, seed: int) -> dict[str, float]:
    """First-token accuracy on ``size`` one-object attribute questions, by kind of question."""
    from flashvlm.eval.first_token import first_token_correct

    examples = [make_example(example_rng(seed, "diagnose", i), "attribute", num_objects=1) for i in range(size)]
    correct = first_token_correct(
        model, processor, [e.render() for e in examples], [e.question for e in examples], [e.answer for e in examples]
    )
    scores = {}
    for kind in ("what color", "what shape"):
        hits = [c for c, e in zip(correct, examples) if e.question.startswith(kind)]
        scores[kind] = round(sum(hits) / len(hits), 3) if hits else float("nan")
    return scores


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder or training run's parts/ (default: the shipped demo model)")
    parser.add_argument("--size", type=int, default=64, help="validation questions (default 64)")


def main(args) -> int:
    model, processor = load_model(demo_model_folder(args.model), "cpu", "float32")
    print(json.dumps(diagnose(model, processor, args.size), indent=2))
    return 0
