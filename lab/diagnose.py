"""Why text relevance does or does not find the queried object: numbers to read, not to train on.

    python -m lab diagnose --model runs/gpu/model --size 64

Prints, over validation questions:
- the norm of projected visual tokens against the norm of word embeddings, and the mean
  cosine between two visual tokens of one image (near 1 = a shared component dominates);
- which prompt words win FlashVLM's soft maximum over text tokens (share of the weight);
- the cosine of the queried object's tokens to the embedding of its colour and shape
  word, against the other objects' tokens.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F

from flashvlm.demo.model import demo_model_folder
from flashvlm.loading import chat_prompt, load_model

from .splits import example_row, object_tokens, split_examples, target_indices
from .train import vision_hidden_states


def diagnose(model, processor, size: int = 64, seed: int = 0, temperature: float = 0.05) -> dict:
    embedding = model.get_input_embeddings()
    projector = model.model.multi_modal_projector
    tokenizer = processor.tokenizer
    image_id = model.config.image_token_id
    word_weight: Counter = Counter()
    visual_norms, word_norms, pairwise, queried_cos, other_cos = [], [], [], [], []
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
        "visual_token_norm": mean(visual_norms),
        "word_embedding_norm": mean(word_norms),
        "mean_cosine_between_visual_tokens": mean(pairwise),
        "top_words_in_text_softmax": {w: round(v, 3) for w, v in word_weight.most_common(6)},
        "object_to_own_attribute_words_cosine": {"queried": mean(queried_cos), "others": mean(other_cos)},
    }


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder or training run's parts/ (default: the shipped demo model)")
    parser.add_argument("--size", type=int, default=64, help="validation questions (default 64)")


def main(args) -> int:
    model, processor = load_model(demo_model_folder(args.model), "cpu", "float32")
    print(json.dumps(diagnose(model, processor, args.size), indent=2))
    return 0
