"""Train the demo VLM the LLaVA-1.5 way around SmolLM2-135M-Instruct, in three stages, from one command.

    python -m lab train --preset gpu --out runs/gpu      # one H100/H200, bf16, about 7 minutes
    python -m lab train --preset smoke --out runs/smoke  # seconds on a CPU: the whole path, tiny

Stages (each resumes from ``OUT/state.pt``; finished stages are skipped):

0. ``clip``: CLIP-style contrastive pre-training of the vision tower on scenes and their
   captions, with a throw-away text encoder: a global term (CLS of the last layer against
   the whole caption) and a FILIP-style token-wise term (each object phrase against its
   best-matching patch of the feature layer), with one attribute-swapped caption per image
   as a hard negative.
1. ``align``: projector alignment, LLaVA's stage 1: the caption is generated from the image
   with the vision tower and the pretrained language model frozen, so projected image
   tokens must land where SmolLM2's word embeddings mean something.
2. ``tune``: instruction tuning, LLaVA's stage 2: the grounded questions, loss on the
   answer only; projector + LoRA on the language model (peft), the tower at a reduced lr.

No loss looks at token selection. Sample ``i`` of a stage is a pure function of
``(seed, stage, i)``, so a resumed run sees the data an uninterrupted one would; a stage
stops at its step count or its wall-clock budget, whichever comes first, and its learning
rate schedule follows whichever of the two is further along. A checkpoint is written every
``checkpoint_seconds`` (one minute) and at the end of each stage. ``OUT/log.jsonl`` logs
losses, throughput, the share of time spent waiting for data and, for ``align`` and
``tune``, ``image_gain`` (loss with each image swapped for another row's minus the loss
with its own: about 0 means the language model ignores the image). The result:
``OUT/parts`` (what the wheel would ship), ``OUT/model`` (the assembled Hugging Face
folder) and ``OUT/metrics.json`` (validation accuracy per family, ``flashvlm.eval``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flashvlm.demo.language_model import language_model_folder
from flashvlm.demo.model import (
    END_OF_TURN,
    GRID,
    IMAGE_MEAN,
    IMAGE_STD,
    Adapter,
    VisionSize,
    assemble,
    build_model,
    build_processor,
    build_tokenizer,
    prompt_text,
    save_parts,
    trained_state,
)

from .scenes import (
    COLORS,
    FAMILIES,
    PLURALS,
    SHAPES,
    ask,
    caption,
    example_rng,
    make_example,
    patch_coverage,
    reading_order,
    split_example,
    vocabulary_words,
)

STAGES = ("clip", "align", "tune")
DESCRIBE = "describe the image ."


@dataclass
class StagePlan:
    steps: int  # at most this many steps
    batch_size: int
    lr: float
    seconds: float | None = None  # wall-clock budget of the stage (None: steps alone)


@dataclass
class TrainConfig:
    seed: int = 0
    vision: VisionSize = field(default_factory=VisionSize)
    adapter: Adapter = field(default_factory=Adapter)
    #: Keep only the first layers of SmolLM2 (tests); None keeps all 30.
    lm_layers: int | None = None
    clip: StagePlan = field(default_factory=lambda: StagePlan(4000, 256, 1e-3, seconds=75))
    align: StagePlan = field(default_factory=lambda: StagePlan(3000, 64, 1e-3, seconds=120))
    tune: StagePlan = field(default_factory=lambda: StagePlan(12000, 64, 2e-4, seconds=210))
    #: Learning rate of the vision tower in ``tune`` as a share of the stage's; 0 freezes it.
    tune_vision_lr_scale: float = 0.5
    #: Train the LoRA adapter in ``align`` too: a truncated SmolLM2 cannot caption without it.
    align_adapter: bool = False
    #: Weight of the grounding term in ``align`` and ``tune`` (0: none); see :func:`grounding_loss`.
    grounding_weight: float = 0.0
    #: Weight of the patch-label term in ``clip`` (0: none); see :func:`patch_label_loss`.
    patch_label_weight: float = 0.0
    #: Weight of the contrastive terms (CLIP's global, FILIP's local) in ``clip``; 0 leaves the
    #: patch-label term alone to train the tower (its throw-away text encoder is never shipped).
    contrastive_weight: float = 1.0
    #: Objects per ``clip`` scene, (fewest, most); None: the benchmark's 3-6. Crowded scenes
    #: hold about three times as many object patches for the patch-label term to teach.
    clip_objects: tuple[int, int] | None = None
    #: Weight of the norm term in ``align`` and ``tune`` (0: none); see :func:`norm_loss`.
    norm_weight: float = 0.0
    #: The first ``tune`` samples are a reading curriculum: one or two objects, attribute and
    #: existence questions only (0: none); see :meth:`StageData.__getitem__`.
    curriculum_samples: int = 0
    #: Questions asked about each ``tune`` image, as turns of one conversation (LLaVA's
    #: multi-turn samples): the first is the benchmark's balanced question, the others come from
    #: :func:`lab.scenes.ask`. The image tokens are most of a sample's cost, so extra turns add
    #: answers to learn from almost for free.
    questions_per_image: int = 1
    #: "bf16": autocast to bfloat16 (CUDA, and CPUs with avx512_bf16 or AMX); "fp32": none.
    precision: str = "bf16"
    weight_decay: float = 0.0
    checkpoint_seconds: float = 60.0
    #: Validation questions scored by first token at every ``tune`` checkpoint, and generated at the end.
    monitor_size: int = 128
    eval_size: int = 400
    workers: int = 0


PRESETS: dict[str, dict] = {
    # One H100/H200 in bf16: 75 + 120 + 210 s of training, then assembly and a 400-question
    # validation run, within 8 minutes. The step counts are ceilings; the seconds decide.
    "gpu": {},
    # This project's 2-core CPU in bf16 autocast: SmolLM2's first 4 layers, a rank-16 LoRA, the
    # grounding and norm terms, a tower taught patch labels alone (no contrastive terms) on
    # crowded scenes, a reading curriculum and four questions per tune image; 15 + 12 + 80
    # minutes of training, then assembly and validation: under 2 hours.
    "cpu": dict(
        lm_layers=4,
        adapter=Adapter(rank=16, alpha=32),
        grounding_weight=1.0,
        patch_label_weight=1.0,
        contrastive_weight=0.0,
        clip_objects=(8, 12),
        norm_weight=1.0,
        curriculum_samples=6_000,
        questions_per_image=4,
        align_adapter=True,
        clip=StagePlan(100_000, 32, 1e-3, seconds=900),
        align=StagePlan(100_000, 16, 1e-3, seconds=720),
        tune=StagePlan(100_000, 16, 1e-3, seconds=4800),
        tune_vision_lr_scale=0.3,
        checkpoint_seconds=300.0,
        monitor_size=64,
    ),
    # Every stage for two steps on a 2-layer SmolLM2 and a tiny tower: the whole path in seconds on a CPU.
    "smoke": dict(
        vision=VisionSize(width=32, layers=3, heads=2),
        adapter=Adapter(rank=4, alpha=8),
        lm_layers=2,
        grounding_weight=1.0,
        patch_label_weight=1.0,
        clip_objects=(8, 12),
        norm_weight=1.0,
        curriculum_samples=2,
        questions_per_image=2,
        precision="fp32",
        clip=StagePlan(2, 4, 1e-3),
        align=StagePlan(2, 2, 1e-3),
        tune=StagePlan(2, 2, 1e-3),
        checkpoint_seconds=60.0,
        monitor_size=4,
        eval_size=4,
    ),
}


def make_config(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    return dataclasses.replace(TrainConfig(), **{**PRESETS[preset], **overrides})


# -- data ----------------------------------------------------------------------------------


def pixel_tensor(images) -> torch.Tensor:
    """What the processor makes of 224 px RGB images, without its per-image overhead: (B, 3, H, W)."""
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0  # (B, H, W, 3)
    mean, std = np.array(IMAGE_MEAN, dtype=np.float32), np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy((array - mean) / std).permute(0, 3, 1, 2).contiguous()


def word_ids() -> dict[str, int]:
    """The contrastive text encoder's vocabulary: the benchmark's words, 0 = no word."""
    return {word: index + 1 for index, word in enumerate(vocabulary_words())}


class GroundingWords:
    """The SmolLM2 tokens the grounding term scores every patch against, and each patch's labels.

    Attribute tokens (" red", " square", " squares", ...) are positive on the patches an
    object of that colour or shape covers (at least ``coverage`` of the patch); every other
    token a prompt of the benchmark holds (the chat template, question words) is negative on
    every patch, since FlashVLM's relevance takes a soft maximum over all of them.
    """

    def __init__(self, tokenizer, seed: int = 0, coverage: float = 0.2, prompts: int = 400) -> None:
        first = lambda word: tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        self.attribute = {word: first(word) for word in [*COLORS, *SHAPES, *PLURALS.values()]}
        image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        seen = {image_id, *self.attribute.values()}
        others: dict[int, None] = {}
        for index in range(prompts):  # the validation stream's questions: every template and question word
            for token in tokenizer(prompt_text(split_example(seed, "validation", index).question))["input_ids"]:
                if token not in seen:
                    others[token] = None
        self.ids = [*self.attribute.values(), *others]  # (W,) token ids, attributes first
        self.coverage = coverage

    def labels(self, objects) -> torch.Tensor:
        """(N, W) float labels of one scene's patches: 1 where the patch shows that attribute."""
        column = {word: index for index, word in enumerate(self.attribute)}
        labels = torch.zeros(GRID * GRID, len(self.ids))
        for obj in objects:
            covered = torch.from_numpy(patch_coverage(obj) >= self.coverage)
            for word in (obj.color, obj.shape, PLURALS[obj.shape]):
                labels[covered, column[word]] = 1.0
        return labels


class StageData(torch.utils.data.Dataset):
    """Sample ``index`` of one stage's stream: a pure function of (seed, stage, index)."""

    def __init__(
        self,
        stage: str,
        seed: int,
        lm_folder: Path,
        grounding: bool = False,
        curriculum_samples: int = 0,
        with_patch_labels: bool = False,
        clip_objects: tuple[int, int] | None = None,
        questions_per_image: int = 1,
    ) -> None:
        self.stage, self.seed = stage, seed
        self.questions_per_image = questions_per_image if stage == "tune" else 1
        self.clip_objects = clip_objects if stage == "clip" else None
        self.curriculum_samples = curriculum_samples if stage == "tune" else 0
        # Rendering each object's coverage mask costs as much as the scene: only when the term is on.
        self.with_patch_labels = with_patch_labels and stage == "clip"
        self.tokenizer = build_tokenizer(lm_folder)
        self.image_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.image_token)
        self.words = word_ids()
        self.grounding = GroundingWords(self.tokenizer, seed) if grounding and stage != "clip" else None

    def __len__(self) -> int:
        return 2**31

    def prompt_ids(self, question: str) -> list[int]:
        """The tokenized chat prompt with the one image token expanded to the tower's 256."""
        ids = self.tokenizer(prompt_text(question))["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * GRID * GRID + ids[at + 1 :]

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, self.stage, index)
        if index < self.curriculum_samples:
            # Reading first: with one or two objects, the image's mean already answers, so the
            # language model is rewarded for looking before it must find the queried object.
            example = make_example(rng, rng.choice(("attribute", "existence")), num_objects=rng.randint(1, 2))
        elif self.clip_objects is not None:
            example = make_example(rng, rng.choice(FAMILIES), num_objects=rng.randint(*self.clip_objects))
        else:
            example = make_example(rng, rng.choice(FAMILIES))
        pixels = pixel_tensor([example.render()])[0]  # (3, H, W)
        if self.stage == "clip":
            labels = patch_classes(example.objects) if self.with_patch_labels else {}
            return {"pixels": pixels, **self.phrases(example, rng), **labels}
        question, answer = (
            (DESCRIBE, caption(example.objects)) if self.stage == "align" else (example.question, example.answer)
        )
        prompt = self.prompt_ids(question)
        target = self.tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
        ids, labels = prompt + target, [-100] * len(prompt) + target
        families = ("attribute", "existence") if index < self.curriculum_samples else FAMILIES
        questions = {question}
        for _ in range(3 * (self.questions_per_image - 1)):  # a few tries: small scenes have few questions
            if len(questions) == self.questions_per_image:
                break
            asked = ask(rng, example.objects, rng.choice(families))
            if asked is None or asked[0] in questions:  # a repeated question would be answered by copying
                continue
            questions.add(asked[0])
            # The next turn, as CHAT_TEMPLATE writes it: the newline after <|im_end|>, the user's
            # question, the assistant's answer (the only labelled tokens).
            turn = self.tokenizer(
                f"\n<|im_start|>user\n{asked[0]}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
            )["input_ids"]
            target = self.tokenizer(asked[1] + END_OF_TURN, add_special_tokens=False)["input_ids"]
            ids, labels = ids + turn + target, labels + [-100] * len(turn) + target
        sample = {"ids": ids, "labels": labels, "pixels": pixels}
        if self.grounding is not None:
            sample["patch_labels"] = self.grounding.labels(example.objects)  # (N, W)
        return sample

    def phrases(self, example, rng: random.Random) -> dict:
        """Object phrases in reading order, and the same with one object's colour or shape swapped."""
        objects = [example.objects[i] for i in reading_order(example.objects)]
        words = [[obj.size, obj.color, obj.shape] for obj in objects]
        swapped = [list(w) for w in words]
        victim = rng.randrange(len(swapped))
        if rng.random() < 0.5:
            swapped[victim][1] = rng.choice([c for c in COLORS if c != swapped[victim][1]])
        else:
            swapped[victim][2] = rng.choice([s for s in SHAPES if s != swapped[victim][2]])
        to_ids = lambda rows: [[self.words[w] for w in row] for row in rows]  # noqa: E731
        return {"phrases": to_ids(words), "negative": to_ids(swapped)}


COLORS_INDEX = {color: index for index, color in enumerate(COLORS)}


def patch_classes(objects, coverage: float = 0.3) -> dict[str, torch.Tensor]:
    """Each patch's colour and shape (index + 1; 0 = background): the object covering the most
    of it, if that is at least ``coverage`` of the patch. (N,) long each."""
    shares = torch.stack([torch.from_numpy(patch_coverage(obj)) for obj in objects])  # (O, N)
    best, owner = shares.max(dim=0)
    on_object = best >= coverage
    colors = torch.tensor([COLORS_INDEX[obj.color] + 1 for obj in objects])[owner] * on_object
    shapes = torch.tensor([SHAPES.index(obj.shape) + 1 for obj in objects])[owner] * on_object
    return {"patch_colors": colors, "patch_shapes": shapes}


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    batch: dict[str, torch.Tensor] = {"pixel_values": torch.stack([s["pixels"] for s in samples])}
    for key in ("patch_colors", "patch_shapes"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])  # (B, N)
    if "patch_labels" in samples[0]:
        batch["patch_labels"] = torch.stack([s["patch_labels"] for s in samples])  # (B, N, W)
    if "ids" in samples[0]:
        width = max(len(s["ids"]) for s in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)  # right-padded
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : len(s["ids"])] = torch.tensor(s["ids"])
            labels[row, : len(s["labels"])] = torch.tensor(s["labels"])
            mask[row, : len(s["ids"])] = 1
        batch.update(input_ids=ids, labels=labels, attention_mask=mask)
    if "phrases" in samples[0]:
        for key in ("phrases", "negative"):
            most = max(len(s[key]) for s in samples)
            tensor = torch.zeros(len(samples), most, 3, dtype=torch.long)  # (B, P, 3 words), 0 = no phrase
            for row, s in enumerate(samples):
                tensor[row, : len(s[key])] = torch.tensor(s[key])
            batch[key] = tensor
    return batch


def batches(
    stage: str,
    seed: int,
    plan: StagePlan,
    start_step: int,
    workers: int,
    lm_folder: Path,
    grounding: bool = False,
    curriculum_samples: int = 0,
    with_patch_labels: bool = False,
    clip_objects: tuple[int, int] | None = None,
    questions_per_image: int = 1,
):
    """Batches ``start_step .. plan.steps - 1`` of a stage, in order."""
    indices = [
        list(range(step * plan.batch_size, (step + 1) * plan.batch_size)) for step in range(start_step, plan.steps)
    ]
    loader = torch.utils.data.DataLoader(
        StageData(
            stage, seed, lm_folder, grounding, curriculum_samples, with_patch_labels, clip_objects, questions_per_image
        ),
        batch_sampler=indices,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=8 if workers else None,
    )
    yield from loader


def data_rate(stage: str, lm_folder: Path, samples: int = 64, seed: int = 0) -> float:
    """Samples per CPU-second one process prepares (render, normalise, tokenize) for ``stage``.

    CPU time, not wall time, so a machine shared with other jobs still measures what one core does.
    """
    data = StageData(stage, seed, lm_folder)
    data[0]
    began = time.process_time()
    for index in range(samples):
        data[index]
    return samples / (time.process_time() - began)


# -- the model's training forward -----------------------------------------------------------


def feature_layer_index(model) -> int:
    """Index of the encoder layer whose output LLaVA projects (hidden_states[-2] -> layers[-2])."""
    layers = len(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer
    return (feature_layer if feature_layer >= 0 else layers + 1 + feature_layer) - 1


def vision_hidden_states(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the encoder layers up to LLaVA's feature layer, CLS included: [(B, 1+N, C), ...].

    Layers past the feature layer do not affect the VLM's output, so they are not run.
    """
    tower = model.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    outputs = []
    for layer in tower.encoder.layers[: feature_layer_index(model) + 1]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        outputs.append(hidden)
    return outputs


def projected_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected visual tokens LLaVA feeds the language model: (B, N, D)."""
    features = vision_hidden_states(model, pixel_values)[-1][:, 1:]  # (B, N, C), CLS dropped
    return model.model.multi_modal_projector(features)


def multimodal_logits(model, batch: dict, scored: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """The VLM's logits at the ``scored`` positions (B, L) bool, as ``model(...)`` computes them: (P, V).

    Only scored positions go through the 49 k-word head: a full (B, L, V) tensor would not fit.
    """
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    is_image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    return model.lm_head(hidden[scored])


def answer_loss(
    model, batch: dict, grounding: GroundingHead | None = None, norm: NormTerm | None = None
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the labelled tokens (position t predicts token t + 1), and their accuracy.

    With ``grounding`` (and ``patch_labels`` in the batch) and ``norm``, their weighted terms are added.
    """
    labels = batch["labels"]
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][labels[:, 1:] != -100]
    projected = projected_tokens(model, batch["pixel_values"])
    logits = multimodal_logits(model, batch, scored, projected)
    loss = F.cross_entropy(logits.float(), targets)
    metrics = {"acc": (logits.argmax(-1) == targets).float().mean().item()}
    if grounding is not None and "patch_labels" in batch:
        term, grounding_metrics = grounding_loss(model, grounding, projected, batch["patch_labels"])
        metrics = {**metrics, "answer": loss.item(), **grounding_metrics}
        loss = loss + grounding.weight * term
    if norm is not None:
        term, norm_metrics = norm_loss(norm, projected)
        metrics = {**metrics, **norm_metrics}
        loss = loss + norm.weight * term
    return loss, metrics


@dataclass(frozen=True)
class NormTerm:
    """The norm term's weight and target: the mean norm of SmolLM2's input embeddings."""

    weight: float
    target: float

    @classmethod
    def of(cls, model, weight: float) -> NormTerm:
        return cls(weight, model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item())


def norm_loss(norm: NormTerm, projected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean squared log-ratio of each projected token's norm to the text embeddings' mean norm.

    Nothing else bounds the projected tokens' scale (the grounding term is a cosine): left
    free, the shipped 4-layer model's tokens grew to 26x the word embeddings' norm, their
    residual stream to 1,000 after its third layer, and its heads used them as attention
    sinks: the last position attended to the image and its logits did not change with it.
    """
    norms = projected.float().norm(dim=-1)  # (B, N)
    term = (norms / norm.target).log().square().mean()
    return term, {"norm_ratio": (norms.mean() / norm.target).item()}


class GroundingHead(nn.Module):
    """The grounding term's token ids, weight, and learned sigmoid scale and bias (not part of the VLM)."""

    def __init__(self, token_ids: list[int], weight: float) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.weight = weight
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))


def grounding_loss(model, head: GroundingHead, projected: torch.Tensor, labels: torch.Tensor):
    """Sigmoid loss on the cosine of each projected token with SmolLM2's embedding of each word.

    FlashVLM's text relevance is exactly this cosine (projected token against the prompt's
    input embeddings), so LLaVA's caption-only alignment, which on a 558 k-caption budget
    places image tokens near the words that describe them, is helped along on ours: patches
    of a red square move towards " red" and " square", every patch away from the template's
    and the question's other words. Positives and negatives are averaged apart (an object
    covers a few of 256 patches). No term looks at which tokens a method keeps.
    """
    words = F.normalize(model.get_input_embeddings().weight[head.token_ids].detach().float(), dim=-1)  # (W, D)
    cosine = F.normalize(projected.float(), dim=-1) @ words.T  # (B, N, W)
    logits = head.log_scale.exp() * cosine + head.bias
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    positive = labels > 0
    term = losses[positive].mean() + losses[~positive].mean()
    gap = cosine[positive].mean() - cosine[~positive].mean()
    return term, {"grounding": term.item(), "cosine_gap": gap.item()}


# -- stage 0's throw-away text side -------------------------------------------------------


class CaptionEncoder(nn.Module):
    """CLIP's text side, shrunk: object phrases -> vectors, a caption -> their pooled vector."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, width, padding_idx=0)
        self.slots = nn.Parameter(torch.randn(3, width) * 0.02)  # size, colour, shape: order matters
        self.phrase = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.pooled = nn.Linear(width, width)

    def forward(self, phrases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phrases (B, P, 3) -> phrase vectors (B, P, W), caption vectors (B, W), mask (B, P)."""
        mask = phrases[..., 0] != 0
        vectors = self.phrase((self.words(phrases) + self.slots).sum(dim=2))
        pooled = (vectors * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return vectors, self.pooled(pooled), mask


class ContrastiveHeads(nn.Module):
    """Image-side projections and temperatures of the contrastive stage (not part of the VLM)."""

    def __init__(self, vision_width: int, vocab_size: int) -> None:
        super().__init__()
        self.text = CaptionEncoder(vocab_size, vision_width)
        self.global_projection = nn.Linear(vision_width, vision_width, bias=False)
        self.patch_projection = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, vision_width))
        self.log_scale = nn.Parameter(torch.tensor([math.log(10.0), math.log(10.0)]))
        # Patch labels: colour and shape of the object under each patch, 0 = background.
        self.patch_colors = nn.Linear(vision_width, len(COLORS) + 1)
        self.patch_shapes = nn.Linear(vision_width, len(SHAPES) + 1)


def patch_label_loss(heads: ContrastiveHeads, features: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of each feature-layer patch token's colour and shape (background a class).

    The contrastive terms alone leave the tower's patches knowing their colour (a nearest
    colour word is right for 99.6 % of object patches) but not their object's shape (37 %,
    chance 25 %): a 14 px patch sees an edge or a corner, and only the tower's attention
    can tell it which shape that is part of. Without it, no question that names a shape can
    be answered. A real CLIP learns this from 400 M captions; the scenes' generator knows
    every patch's labels, so the tower is taught them directly.
    """
    patches = features[:, 1:]  # (B, N, C), CLS dropped
    colors, shapes = heads.patch_colors(patches).float(), heads.patch_shapes(patches).float()  # (B, N, 1 + classes)
    on_object = batch["patch_shapes"] > 0  # (B, N): about 1 patch in 10
    losses = F.cross_entropy(colors.transpose(1, 2), batch["patch_colors"], reduction="none") + F.cross_entropy(
        shapes.transpose(1, 2), batch["patch_shapes"], reduction="none"
    )  # (B, N)
    # Object and background patches averaged apart, so that the background does not drown the objects.
    loss = losses[on_object].mean() + losses[~on_object].mean()
    shape_accuracy = (shapes.argmax(-1) == batch["patch_shapes"])[on_object].float().mean()
    return loss, {"patch_shape_acc": shape_accuracy.item()}


def contrastive_loss(
    model, heads: ContrastiveHeads, batch: dict, patch_label_weight: float = 0.0, contrastive_weight: float = 1.0
) -> tuple[torch.Tensor, dict]:
    tower = model.model.vision_tower
    hidden = vision_hidden_states(model, batch["pixel_values"])
    last = hidden[-1]
    for layer in tower.encoder.layers[len(hidden) :]:  # the global term trains the last layer, as CLIP does
        last = layer(last, None)
        last = last[0] if isinstance(last, tuple) else last
    image_global = F.normalize(heads.global_projection(tower.post_layernorm(last[:, 0])), dim=-1)  # (B, W)
    patches = F.normalize(heads.patch_projection(hidden[-1][:, 1:]), dim=-1)  # (B, N, W)

    phrase_vectors, caption_vectors, mask = heads.text(batch["phrases"])
    caption_vectors = F.normalize(caption_vectors, dim=-1)
    phrase_vectors = F.normalize(phrase_vectors, dim=-1)
    negative_vectors, _, negative_mask = heads.text(batch["negative"])
    negative_vectors = F.normalize(negative_vectors, dim=-1)
    scale_global, scale_local = heads.log_scale.clamp(max=math.log(100.0)).exp()

    targets = torch.arange(patches.shape[0], device=patches.device)
    logits = scale_global * image_global @ caption_vectors.T  # (B_img, B_txt)
    global_loss = (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.T.float(), targets)) / 2

    def token_wise(phr: torch.Tensor, phr_mask: torch.Tensor) -> torch.Tensor:
        """FILIP similarity: mean over a caption's phrases of the best patch. (B_img, B_txt)"""
        best = torch.einsum("inw,tpw->itpn", patches, phr).amax(dim=-1)  # (B_img, B_txt, P)
        return (best * phr_mask).sum(-1) / phr_mask.sum(-1).clamp(min=1)

    local = token_wise(phrase_vectors, mask)
    hard = torch.einsum("inw,ipw->ipn", patches, negative_vectors).amax(dim=-1)  # (B, P): own swapped caption
    hard = (hard * negative_mask).sum(-1) / negative_mask.sum(-1).clamp(min=1)
    local_logits = (scale_local * torch.cat([local, hard[:, None]], dim=1)).float()
    local_loss = (F.cross_entropy(local_logits, targets) + F.cross_entropy(scale_local * local.T.float(), targets)) / 2
    accuracy = (local_logits.argmax(1) == targets).float().mean()
    loss = contrastive_weight * (global_loss + local_loss)
    metrics = {"global": global_loss.item(), "local": local_loss.item(), "acc": accuracy.item()}
    if patch_label_weight > 0:
        term, patch_metrics = patch_label_loss(heads, hidden[-1], batch)
        loss, metrics = loss + patch_label_weight * term, {**metrics, **patch_metrics}
    return loss, metrics


# -- training loop -----------------------------------------------------------------------


def trainable_groups(model, stage: str, config: TrainConfig, heads: nn.Module | None) -> list[dict]:
    """Parameter groups of a stage; everything else is frozen."""
    core = model.model
    lr = getattr(config, stage).lr
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    extra = list(heads.parameters()) if heads is not None else []
    if stage == "clip":
        params = [*core.vision_tower.parameters(), *extra]
    else:
        lora = [p for name, p in core.language_model.named_parameters() if ".lora_" in name]
        adapter = lora if stage == "tune" or config.align_adapter else []
        params = [*core.multi_modal_projector.parameters(), *adapter, *extra]
    groups = [{"params": params, "lr": lr}]
    if stage == "tune" and config.tune_vision_lr_scale > 0:
        groups.append({"params": list(core.vision_tower.parameters()), "lr": lr * config.tune_vision_lr_scale})
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
        group["base_lr"] = group["lr"]
    return groups


def learning_rate_factor(progress: float) -> float:
    """Linear warm-up over the first 5 % of the stage, then cosine decay to 10 %; progress in [0, 1]."""
    if progress < 0.05:
        return max(progress, 0.002) / 0.05
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.05) / 0.95)))


def image_gain(model, batch: dict, autocast) -> float:
    """Loss with each image swapped for another batch row's, minus the loss with its own.

    About 0 means the language model does not use the image yet, whatever the loss says.
    """
    shuffled = {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}
    with torch.no_grad(), autocast:
        own, _ = answer_loss(model, batch)
        other, _ = answer_loss(model, shuffled)
    return round(other.item() - own.item(), 4)


def monitor(model, processor, size: int, seed: int) -> dict[str, float]:
    """First-token accuracy per family on the first ``size`` validation questions."""
    from flashvlm.eval.first_token import first_token_correct

    from .splits import split_examples

    examples = split_examples("validation", size, seed)
    was_training = model.training
    model.eval()
    correct = first_token_correct(
        model, processor, [e.render() for e in examples], [e.question for e in examples], [e.answer for e in examples]
    )
    model.train(was_training)
    by_family = {family: [c for c, e in zip(correct, examples) if e.family == family] for family in FAMILIES}
    scores = {family: round(sum(hits) / len(hits), 3) for family, hits in by_family.items() if hits}
    return {**scores, "overall": round(sum(correct) / len(correct), 3)}


def save_state(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


class Trainer:
    """One run folder: the model, its resumable state and its log."""

    def __init__(self, config: TrainConfig, out: Path, device: torch.device, lm_folder: Path) -> None:
        self.config, self.out, self.device, self.lm_folder = config, out, device, lm_folder
        self.model = build_model(lm_folder, config.vision, config.adapter, config.lm_layers, config.seed).to(device)
        self.processor = build_processor(lm_folder)
        self.state: dict = {"completed": []}
        if (out / "state.pt").exists():
            self.state = torch.load(out / "state.pt", map_location=device, weights_only=False)
            self.model.load_state_dict(self.state["trained"], strict=False)
            self.log({"resumed": self.state["stage"], "step": self.state["step"], "completed": self.state["completed"]})
        if config.precision not in ("bf16", "fp32"):
            raise ValueError(f"unknown precision {config.precision!r}; bf16 or fp32")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    def log(self, line: dict) -> None:
        tqdm.write(json.dumps(line))
        with (self.out / "log.jsonl").open("a") as handle:
            handle.write(json.dumps(line) + "\n")

    def checkpoint(self, stage: str, step: int, elapsed: float, optimizer, heads, finished: bool) -> None:
        completed = self.state.get("completed", [])
        self.state = {
            "stage": stage,
            "step": step,
            "elapsed": elapsed,
            "trained": trained_state(self.model),
            "optimizer": optimizer.state_dict(),
            "heads": heads.state_dict() if heads is not None else None,
            "completed": [*completed, stage] if finished else completed,
            "config": dataclasses.asdict(self.config),
        }
        save_state(self.out / "state.pt", self.state)

    def heads(self, stage: str) -> nn.Module | None:
        """The stage's training-only modules: contrastive heads (clip), the grounding head (align, tune) or none."""
        if stage == "clip":
            return ContrastiveHeads(self.config.vision.width, len(word_ids()) + 1).to(self.device)
        if self.config.grounding_weight > 0:
            words = GroundingWords(build_tokenizer(self.lm_folder), self.config.seed)
            return GroundingHead(words.ids, self.config.grounding_weight).to(self.device)
        return None

    def run_stage(self, stage: str) -> None:
        config, model, device = self.config, self.model, self.device
        plan: StagePlan = getattr(config, stage)
        heads = self.heads(stage)
        groups = trainable_groups(model, stage, config, heads)
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        start, elapsed = 0, 0.0
        if self.state.get("stage") == stage:
            optimizer.load_state_dict(self.state["optimizer"])
            if heads is not None:
                heads.load_state_dict(self.state["heads"])
            start, elapsed = self.state["step"], self.state["elapsed"]
        model.train()
        progress_bar = tqdm(total=plan.steps, initial=start, desc=f"{stage:>5}", dynamic_ncols=True, mininterval=5)
        running: dict[str, float] = {}
        resumed_at, last_save, waiting, done = time.perf_counter() - elapsed, time.perf_counter(), 0.0, start
        grounding = isinstance(heads, GroundingHead)
        norm = NormTerm.of(model, config.norm_weight) if stage != "clip" and config.norm_weight > 0 else None
        loader = iter(
            batches(
                stage,
                config.seed,
                plan,
                start,
                config.workers,
                self.lm_folder,
                grounding,
                config.curriculum_samples,
                with_patch_labels=config.patch_label_weight > 0,
                clip_objects=config.clip_objects,
                questions_per_image=config.questions_per_image,
            )
        )
        for step in range(start, plan.steps):
            asked = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            waiting += time.perf_counter() - asked
            elapsed = time.perf_counter() - resumed_at
            share = max(step / plan.steps, elapsed / plan.seconds if plan.seconds else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * learning_rate_factor(share)
            with self.autocast:
                loss, metrics = (
                    contrastive_loss(model, heads, batch, config.patch_label_weight, config.contrastive_weight)
                    if stage == "clip"
                    else answer_loss(model, batch, heads, norm)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            for key, value in {"loss": loss.item(), **metrics}.items():
                running[key] = 0.95 * running.get(key, value) + 0.05 * value
            progress_bar.update(1)
            progress_bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
            done = step + 1
            out_of_time = plan.seconds is not None and time.perf_counter() - resumed_at >= plan.seconds
            finished = done == plan.steps or out_of_time
            if finished or time.perf_counter() - last_save >= config.checkpoint_seconds:
                elapsed = time.perf_counter() - resumed_at
                line = {"stage": stage, "step": done, "seconds": round(elapsed, 1), **running}
                line["samples_per_second"] = round((done - start) * plan.batch_size / max(elapsed, 1e-9), 1)
                line["data_wait_share"] = round(waiting / max(elapsed, 1e-9), 3)
                if stage != "clip":
                    line["image_gain"] = image_gain(model, batch, self.autocast)
                if stage == "tune" and config.monitor_size:
                    line["validation_first_token"] = monitor(model, self.processor, config.monitor_size, config.seed)
                self.log(line)
                self.checkpoint(stage, done, elapsed, optimizer, heads, finished)
                last_save = time.perf_counter()
            if finished:
                break
        progress_bar.close()
        model.eval()


def train(config: TrainConfig, out: Path, stages: tuple[str, ...] = STAGES, device: str = "auto") -> dict:
    """Run (or resume) the stages; once all are done, write ``out/parts``, ``out/model`` and ``out/metrics.json``."""
    from flashvlm.eval import answer_questions, load_dataset, summarize
    from flashvlm.loading import load_model

    from .splits import export_split

    began = time.perf_counter()
    torch_device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    )
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out, torch_device, language_model_folder())
    for stage in stages:
        if stage not in trainer.state["completed"]:
            trainer.run_stage(stage)
    if set(STAGES) - set(trainer.state["completed"]):
        return {"completed": trainer.state["completed"]}  # a partial run: no model yet
    save_parts(trainer.model, out / "parts", config.vision, config.adapter, config.lm_layers)
    del trainer
    folder = assemble(out / "parts", folder=out / "model")
    if not config.eval_size:
        return {"completed": list(STAGES), "wall_seconds": round(time.perf_counter() - began, 1)}
    model, processor = load_model(str(folder), device=str(torch_device), dtype="auto")
    examples = load_dataset(export_split("validation", out / "validation", config.eval_size, config.seed)).examples
    results = answer_questions(
        model, processor, examples, "none", 1.0, batch_size=32, max_new_tokens=4, prompt_suffix=""
    )
    summary = summarize("none", "all", results)
    validation = {**summary.family_accuracy, "overall": summary.accuracy}
    metrics = {"validation": validation, "wall_seconds": round(time.perf_counter() - began, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(metrics) + "\n")
    return metrics


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, type=Path, help="run folder: state.pt, log.jsonl, parts/, model/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--workers", type=int, help="data-loading processes (default: 0 on CPU, cores - 1 with CUDA)")
    for stage in STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, help=f"most steps of stage {stage}")
        parser.add_argument(f"--{stage}-seconds", type=float, help=f"wall-clock budget of stage {stage}")
        parser.add_argument(f"--{stage}-batch", type=int, help=f"batch size of stage {stage}")
        parser.add_argument(f"--{stage}-lr", type=float, help=f"peak learning rate of stage {stage}")
    parser.add_argument("--lm-layers", type=int, help="SmolLM2 decoder layers kept, from the first (1-30)")
    parser.add_argument("--patch-label-weight", type=float, help="weight of the tower's patch-label term (0: none)")
    parser.add_argument(
        "--clip-objects", help="objects per clip-stage scene as FEWEST-MOST, e.g. 8-12 (default: the preset's)"
    )
    parser.add_argument(
        "--contrastive-weight",
        type=float,
        help="weight of the tower's contrastive terms in clip (0: patch labels alone)",
    )
    parser.add_argument("--norm-weight", type=float, help="weight of the projected tokens' norm term (0: none)")
    parser.add_argument("--curriculum-samples", type=int, help="tune samples of one or two objects that come first")
    parser.add_argument(
        "--questions-per-image", type=int, help="questions asked about each tune image, as turns of one conversation"
    )
    parser.add_argument("--checkpoint-seconds", type=float, help="seconds between checkpoints (and log lines)")
    parser.add_argument("--monitor-size", type=int, help="validation questions scored at each tune checkpoint")
    parser.add_argument("--eval-size", type=int, help="validation questions generated at the end (0: none)")


def config_from_arguments(args) -> tuple[TrainConfig, tuple[str, ...]]:
    """The preset with the command line's overrides, and the stages to run; ValueError names a bad value."""
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    config = make_config(args.preset)
    overrides: dict = {"seed": args.seed}
    for stage in STAGES:
        changes = {
            key: getattr(args, f"{stage}_{name}")
            for key, name in (("steps", "steps"), ("seconds", "seconds"), ("batch_size", "batch"), ("lr", "lr"))
            if getattr(args, f"{stage}_{name}") is not None
        }
        overrides[stage] = dataclasses.replace(getattr(config, stage), **changes)
    for name in (
        "lm_layers",
        "patch_label_weight",
        "contrastive_weight",
        "norm_weight",
        "curriculum_samples",
        "questions_per_image",
        "checkpoint_seconds",
        "monitor_size",
        "eval_size",
    ):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if overrides.get("lm_layers") is not None and not 1 <= overrides["lm_layers"] <= 30:
        raise ValueError(f"--lm-layers: SmolLM2 has 30 layers; got {overrides['lm_layers']}")
    if overrides.get("questions_per_image", 1) < 1:
        raise ValueError(f"--questions-per-image must be >= 1; got {overrides['questions_per_image']}")
    if args.clip_objects is not None:
        overrides["clip_objects"] = parse_object_range(args.clip_objects)
    for name in (
        "patch_label_weight",
        "contrastive_weight",
        "norm_weight",
        "curriculum_samples",
        "monitor_size",
        "eval_size",
    ):
        if overrides.get(name, 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {overrides[name]}")
    uses_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    default_workers = max(1, (os.cpu_count() or 2) - 1) if uses_cuda else 0
    overrides["workers"] = args.workers if args.workers is not None else default_workers
    return dataclasses.replace(config, **overrides), stages


def parse_object_range(text: str) -> tuple[int, int]:
    """ "8-12" -> (8, 12); ValueError names the value and what is accepted."""
    fewest, _, most = text.partition("-")
    try:
        low, high = int(fewest), int(most or fewest)
    except ValueError:
        low = high = -1
    if not 1 <= low <= high <= 12:
        raise ValueError(f"--clip-objects {text!r}: give FEWEST-MOST with 1 <= FEWEST <= MOST <= 12, e.g. 8-12")
    return low, high


def main(args) -> int:
    config, stages = config_from_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = train(config, args.out, stages, args.device)
    print(json.dumps(metrics, indent=2))
    return 0


def data_rate_main(args) -> int:
    folder = language_model_folder()
    for stage in STAGES:
        print(f"{stage}: {data_rate(stage, folder, args.samples):.0f} samples per CPU-second (one data worker)")
    return 0


def training_speed(lm_folder: Path, layers: int | None, batch_size: int, precision: str, steps: int = 3) -> float:
    """Samples per second of ``tune`` steps (tower, projector and LoRA trained) on one fixed batch, after a warm-up."""
    config = make_config("cpu", lm_layers=layers)
    model = build_model(lm_folder, config.vision, config.adapter, layers, config.seed)
    data = StageData("tune", config.seed, lm_folder)
    batch = collate([data[index] for index in range(batch_size)], pad_id=model.config.pad_token_id)
    optimizer = torch.optim.AdamW(trainable_groups(model, "tune", config, None))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    seconds = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        with autocast:
            loss, _ = answer_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - began)
    return batch_size * steps / sum(seconds[1:])


def speed_main(args) -> int:
    if max(args.layers) > 30:
        raise ValueError(f"--layers: SmolLM2 has 30 layers; got {max(args.layers)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    folder = language_model_folder()
    print("| SmolLM2 layers | batch | precision | samples/s |")
    print("|---|---|---|---|")
    for layers in args.layers:
        for batch_size in args.batch:
            for precision in ("fp32", "bf16"):
                rate = training_speed(folder, layers, batch_size, precision, args.steps)
                print(f"| {layers} | {batch_size} | {precision} | {rate:.2f} |", flush=True)
    return 0
