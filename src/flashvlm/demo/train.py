"""Train the demo model the LLaVA way, in four stages, from one command.

    python -m flashvlm.demo.train --preset cpu --out runs/cpu --seed 0
    python -m flashvlm.demo.train --preset gpu --out runs/gpu --seed 0   # on a CUDA machine

Stages (each resumes from ``OUT/state.pt`` if interrupted; finished stages are skipped):

1. ``lm``: language-model pretraining on text: a scene's caption stands where the image
   will be, followed by a question and its answer, so words get meaningful embeddings
   and the LM learns the question logic before it sees a pixel.
2. ``clip``: CLIP-style contrastive pretraining of the vision tower against captions,
   with a throw-away text encoder: a global term (CLS of the last layer against the
   whole caption) and a FILIP-style token-wise term (each object phrase against its
   best-matching patch of the feature layer), with one attribute-swapped caption per
   image as a hard negative.
3. ``align``: projector-only alignment: the image's caption is generated from the image
   with the vision tower and the LM frozen.
4. ``tune``: instruction tuning of projector and LM on the benchmark's questions (loss on
   the answer only); the vision tower may be tuned at a reduced learning rate.

No loss looks at token selection. Data is drawn per sample from ``(seed, stage, index)``,
so a resumed run sees exactly the data an uninterrupted one would. The result is a
Hugging Face folder ``OUT/model`` and validation accuracy per family in ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
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

from .data import object_tokens
from .model import (
    EOS,
    ModelSize,
    build_model,
    build_processor,
    build_tokenizer,
    multimodal_logits,
    pixel_tensor,
    vision_hidden_states,
    vocabulary,
)
from .scenes import COLORS, FAMILIES, GRID, SHAPES, caption, example_rng, make_example, reading_order

STAGES = ("lm", "clip", "align", "tune")
DESCRIBE = "describe the image ."


@dataclass
class StagePlan:
    steps: int
    batch_size: int
    lr: float


@dataclass
class TrainConfig:
    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    lm: StagePlan = field(default_factory=lambda: StagePlan(300, 32, 2e-3))
    clip: StagePlan = field(default_factory=lambda: StagePlan(250, 32, 1e-3))
    align: StagePlan = field(default_factory=lambda: StagePlan(200, 16, 2e-3))
    tune: StagePlan = field(default_factory=lambda: StagePlan(900, 16, 1e-3))
    #: Learning rate of the vision tower in ``tune`` as a share of the stage's; 0 freezes it, as LLaVA-1.5 does.
    tune_vision_lr_scale: float = 0.0
    #: Share of ``lm`` batches that show the scene as a symbolic grid instead of a caption (see StageData).
    lm_grid_share: float = 0.0
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    #: Validation questions scored during ``tune`` (every ``checkpoint_every`` steps) and at the end.
    monitor_size: int = 96
    eval_size: int = 400
    workers: int = 0


PRESETS: dict[str, dict] = {
    # About 45 minutes on one busy CPU core (two cores shared with other jobs).
    "cpu": {},
    # The GPU follow-up: same model, ~1.2 M rendered scenes. Rendering (about 7 ms a scene on
    # one core, spread over the data workers) rather than the GPU sets the pace.
    "gpu": dict(
        lm=StagePlan(3000, 128, 2e-3),
        clip=StagePlan(2000, 256, 1e-3),
        align=StagePlan(1500, 64, 2e-3),
        tune=StagePlan(10000, 64, 5e-4),
        tune_vision_lr_scale=0.1,
        checkpoint_every=1000,
        monitor_size=400,
        eval_size=1000,
    ),
    # A couple of steps of every stage on a very small model, for tests.
    "smoke": dict(
        size=ModelSize(vision_width=32, vision_layers=3, vision_heads=2, text_width=32, text_layers=2, text_heads=2),
        lm=StagePlan(2, 4, 1e-3),
        clip=StagePlan(2, 4, 1e-3),
        align=StagePlan(2, 2, 1e-3),
        tune=StagePlan(2, 2, 1e-3),
        checkpoint_every=1,
        monitor_size=4,
        eval_size=8,
    ),
}


def make_config(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    return dataclasses.replace(TrainConfig(), **{**PRESETS[preset], **overrides})


# -- data ----------------------------------------------------------------------------------


class StageData(torch.utils.data.Dataset):
    """Sample ``index`` of one stage's stream: a pure function of (seed, stage, index)."""

    def __init__(self, stage: str, seed: int, batch_size: int = 1, grid_share: float = 0.0) -> None:
        self.stage, self.seed = stage, seed
        self.batch_size, self.grid_share = batch_size, grid_share
        self.tokenizer = build_tokenizer()
        self.vocab = vocabulary()
        self.image_id = self.vocab["<image>"]
        self.eos_id = self.vocab[EOS]

    def __len__(self) -> int:
        return 2**31

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def prompt_ids(self, question: str) -> list[int]:
        ids = self.encode(f"USER: <image>\n{question} ASSISTANT:")
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * GRID * GRID + ids[at + 1 :]

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, self.stage, index)
        example = make_example(rng, rng.choice(FAMILIES))
        if (
            self.stage == "lm"
            and example_rng(self.seed, "lm-grid", index // self.batch_size).random() < self.grid_share
        ):
            return self.grid_text(example, rng)
        if self.stage == "lm":
            # A quarter of the texts ask for the description back: the copying that ``align`` relies on.
            question, answer = (
                (DESCRIBE, caption(example.objects))
                if rng.random() < 0.25
                else (
                    example.question,
                    example.answer,
                )
            )
            ids = self.encode(f"USER: {caption(example.objects)}\n{question} ASSISTANT: {answer}")
            ids = ids + [self.eos_id]
            return {"ids": ids, "labels": [-100] + ids[1:]}
        if self.stage == "clip":
            return {"pixels": pixel_tensor([example.render()])[0], **self.phrases(example, rng)}
        question, answer = (
            (DESCRIBE, caption(example.objects))
            if self.stage == "align"
            else (
                example.question,
                example.answer,
            )
        )
        prompt = self.prompt_ids(question)
        target = self.encode(answer)[1:] + [self.eos_id]
        return {
            "ids": prompt + target,
            "labels": [-100] * len(prompt) + target,
            "pixels": pixel_tensor([example.render()])[0],
        }

    def grid_text(self, example, rng: random.Random) -> dict:
        """The image prompt with a symbolic picture in place of the image.

        Each of the 256 placeholder positions will hold the mean word embedding of the
        object covering that cell (size, colour, shape; nothing for background), so the
        LM learns to answer from a grid of word-like tokens before it meets projected
        image tokens. The loss is on the answer only.
        """
        question, answer = (
            (DESCRIBE, caption(example.objects))
            if rng.random() < 0.25
            else (
                example.question,
                example.answer,
            )
        )
        grid = [[0, 0, 0] for _ in range(GRID * GRID)]
        for obj in example.objects:  # later objects are drawn on top
            for cell in object_tokens(obj.bbox):
                grid[cell] = [self.vocab[obj.size], self.vocab[obj.color], self.vocab[obj.shape]]
        prompt = self.prompt_ids(question)
        target = self.encode(answer)[1:] + [self.eos_id]
        return {"ids": prompt + target, "labels": [-100] * len(prompt) + target, "grid": grid}

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
        to_ids = lambda rows: [[self.vocab[w] for w in row] for row in rows]  # noqa: E731
        return {"phrases": to_ids(words), "negative": to_ids(swapped)}


def collate(samples: list[dict]) -> dict:
    batch: dict[str, torch.Tensor] = {}
    if "pixels" in samples[0]:
        batch["pixel_values"] = torch.stack([s["pixels"] for s in samples])
    if "ids" in samples[0]:
        width = max(len(s["ids"]) for s in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)  # right-padded with <pad> = 0
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : len(s["ids"])] = torch.tensor(s["ids"])
            labels[row, : len(s["labels"])] = torch.tensor(s["labels"])
            mask[row, : len(s["ids"])] = 1
        batch.update(input_ids=ids, labels=labels, attention_mask=mask)
    if "grid" in samples[0]:
        batch["grid"] = torch.tensor([s["grid"] for s in samples])  # (B, N, 3) word ids, 0 = background
    if "phrases" in samples[0]:
        for key in ("phrases", "negative"):
            most = max(len(s[key]) for s in samples)
            tensor = torch.zeros(len(samples), most, 3, dtype=torch.long)  # (B, P, 3 words), 0 = no phrase
            for row, s in enumerate(samples):
                tensor[row, : len(s[key])] = torch.tensor(s[key])
            batch[key] = tensor
    return batch


def batches(stage: str, seed: int, plan: StagePlan, start_step: int, workers: int, grid_share: float = 0.0):
    """Batches ``start_step .. plan.steps - 1`` of a stage, in order."""
    indices = [
        list(range(step * plan.batch_size, (step + 1) * plan.batch_size)) for step in range(start_step, plan.steps)
    ]
    loader = torch.utils.data.DataLoader(
        StageData(stage, seed, plan.batch_size, grid_share),
        batch_sampler=indices,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


# -- the contrastive stage's throw-away text side -----------------------------------------


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


def contrastive_loss(model, heads: ContrastiveHeads, batch: dict) -> tuple[torch.Tensor, dict]:
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
    global_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def token_wise(phr: torch.Tensor, phr_mask: torch.Tensor) -> torch.Tensor:
        """FILIP similarity: mean over a caption's phrases of the best patch. (B_img, B_txt)"""
        best = torch.einsum("inw,tpw->itpn", patches, phr).amax(dim=-1)  # (B_img, B_txt, P)
        return (best * phr_mask).sum(-1) / phr_mask.sum(-1).clamp(min=1)

    local = token_wise(phrase_vectors, mask)
    hard = torch.einsum("inw,ipw->ipn", patches, negative_vectors).amax(dim=-1)  # (B, P): own swapped caption
    hard = (hard * negative_mask).sum(-1) / negative_mask.sum(-1).clamp(min=1)
    local_logits = scale_local * torch.cat([local, hard[:, None]], dim=1)
    local_loss = (F.cross_entropy(local_logits, targets) + F.cross_entropy(scale_local * local.T, targets)) / 2
    accuracy = (local_logits.argmax(1) == targets).float().mean()
    return global_loss + local_loss, {"global": global_loss.item(), "local": local_loss.item(), "acc": accuracy.item()}


# -- training loop -----------------------------------------------------------------------


def trainable_groups(model, stage: str, config: TrainConfig, heads: nn.Module | None) -> list[dict]:
    """Parameter groups of a stage; everything else is frozen."""
    core = model.model
    lr = getattr(config, stage).lr
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if stage == "lm":
        modules = [core.language_model, model.lm_head]
    elif stage == "clip":
        modules = [core.vision_tower, heads]
    elif stage == "align":
        modules = [core.multi_modal_projector]
    else:
        modules = [core.multi_modal_projector, core.language_model, model.lm_head]
    groups = [{"params": [p for m in modules for p in m.parameters()], "lr": lr}]
    if stage == "tune" and config.tune_vision_lr_scale > 0:
        groups.append({"params": list(core.vision_tower.parameters()), "lr": lr * config.tune_vision_lr_scale})
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
        group["base_lr"] = group["lr"]
    return groups


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def stage_loss(model, stage: str, batch: dict, heads: nn.Module | None) -> tuple[torch.Tensor, dict]:
    if stage == "clip":
        return contrastive_loss(model, heads, batch)
    labels = batch["labels"]
    # Position t predicts token t + 1.
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][labels[:, 1:] != -100]
    if stage == "lm" and "grid" in batch:
        hidden = model.model.language_model(
            inputs_embeds=symbolic_image_embeds(model, batch["input_ids"], batch["grid"]),
            attention_mask=batch["attention_mask"],
        ).last_hidden_state
        logits = model.lm_head(hidden[scored])
    elif stage == "lm":
        hidden = model.model.language_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = model.lm_head(hidden[scored])
    else:
        logits = multimodal_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], scored)
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, {"acc": accuracy.item()}


def symbolic_image_embeds(model, input_ids: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings with each image placeholder replaced by its cell's mean word embedding.

    input_ids (B, L) with N placeholders per row; grid (B, N, 3) word ids, 0 = none. -> (B, L, D)
    """
    embedding = model.get_input_embeddings()
    present = (grid != 0).unsqueeze(-1)  # (B, N, 3, 1)
    words = embedding(grid) * present  # (B, N, 3, D)
    cells = words.sum(2) / present.sum(2).clamp(min=1)  # (B, N, D); background cells are zero
    embeds = embedding(input_ids)
    is_image = input_ids == model.config.image_token_id
    return embeds.masked_scatter(is_image.unsqueeze(-1), cells.to(embeds.dtype))


def image_gain(model, stage: str, batch: dict, autocast) -> float:
    """Loss with each image swapped for another batch row's, minus the loss with its own.

    About 0 means the language model does not use the image yet, whatever the loss says.
    """
    shuffled = {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}
    with torch.no_grad(), autocast:
        own, _ = stage_loss(model, stage, batch, None)
        other, _ = stage_loss(model, stage, shuffled, None)
    return round(other.item() - own.item(), 4)


def save_state(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def run_stage(model, stage: str, config: TrainConfig, out: Path, device: torch.device, state: dict, log) -> None:
    plan: StagePlan = getattr(config, stage)
    heads = ContrastiveHeads(config.size.vision_width, len(vocabulary())).to(device) if stage == "clip" else None
    groups = trainable_groups(model, stage, config, heads)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    start = 0
    if state.get("stage") == stage:
        optimizer.load_state_dict(state["optimizer"])
        if heads is not None:
            heads.load_state_dict(state["heads"])
        start = state["step"]
    model.train()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    progress = tqdm(total=plan.steps, initial=start, desc=f"{stage:>5}", dynamic_ncols=True, mininterval=5)
    running: dict[str, float] = {}
    began = time.perf_counter()
    grid_share = config.lm_grid_share if stage == "lm" else 0.0
    for step, batch in enumerate(batches(stage, config.seed, plan, start, config.workers, grid_share), start=start):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        factor = learning_rate_factor(step, plan.steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with autocast:
            loss, metrics = stage_loss(model, stage, batch, heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        for key, value in {"loss": loss.item(), **metrics}.items():
            running[key] = 0.95 * running.get(key, value) + 0.05 * value
        progress.update(1)
        progress.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == plan.steps:
            line = {"stage": stage, "step": done, "seconds": round(time.perf_counter() - began, 1), **running}
            if stage in ("align", "tune"):
                line["image_gain"] = image_gain(model, stage, batch, autocast)
            if stage == "tune" and config.monitor_size:
                line["validation"] = evaluate_split(model, "validation", config.monitor_size, config.seed, device)
                model.train()
            log(line)
            state = {
                "stage": stage,
                "step": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "heads": heads.state_dict() if heads is not None else None,
                "completed": state.get("completed", []),
                "config": dataclasses.asdict(config),
            }
            if done == plan.steps:
                state["completed"] = [*state["completed"], stage]
            save_state(out / "state.pt", state)
    progress.close()
    model.eval()


def evaluate_split(model, split: str, size: int, seed: int, device: torch.device) -> dict[str, float]:
    from .evaluate import accuracy_by_family, evaluate

    processor = build_processor()
    was_training = model.training
    model.eval()
    records = evaluate(model, processor, split=split, size=size, seed=seed, batch_size=32, progress=False)
    model.train(was_training)
    return accuracy_by_family(records)


def train(config: TrainConfig, out: Path, stages: tuple[str, ...] = STAGES, device: str = "auto") -> dict:
    """Run (or resume) the stages, save ``out/model`` and return validation accuracy by family."""
    torch.manual_seed(config.seed)
    torch_device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    )
    if torch_device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"

    def log(line: dict) -> None:
        tqdm.write(json.dumps(line))
        with log_path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")

    model = build_model(config.size, seed=config.seed).to(torch_device)
    state: dict = {"completed": []}
    if (out / "state.pt").exists():
        state = torch.load(out / "state.pt", map_location=torch_device, weights_only=False)
        model.load_state_dict(state["model"])
        log({"resumed": state["stage"], "step": state["step"], "completed": state["completed"]})
    for stage in stages:
        if stage in state["completed"]:
            continue
        run_stage(model, stage, config, out, torch_device, state, log)
        state = torch.load(out / "state.pt", map_location=torch_device, weights_only=False)
    model.eval()
    model.save_pretrained(out / "model")
    build_processor().save_pretrained(out / "model")
    metrics = {"validation": evaluate_split(model, "validation", config.eval_size, config.seed, torch_device)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashvlm.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, type=Path, help="run folder: state.pt, log.jsonl, model/, metrics.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--workers", type=int, default=None, help="data-loading processes (default 0 on CPU, up to 12 with CUDA)"
    )
    for stage in STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, help=f"steps of stage {stage} (preset's by default)")
        parser.add_argument(f"--{stage}-batch", type=int, help=f"batch size of stage {stage}")
        parser.add_argument(f"--{stage}-lr", type=float, help=f"peak learning rate of stage {stage}")
    parser.add_argument("--tune-vision-lr-scale", type=float, help="vision tower lr in tune, as a share (0 freezes)")
    parser.add_argument("--lm-grid-share", type=float, help="share of lm batches showing a symbolic grid (0..1)")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--eval-size", type=int, help="validation questions scored at the end")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict = {"seed": args.seed}
    config = make_config(args.preset)
    for stage in STAGES:
        plan = getattr(config, stage)
        changes = {
            key: value
            for key, value in (
                ("steps", getattr(args, f"{stage}_steps")),
                ("batch_size", getattr(args, f"{stage}_batch")),
                ("lr", getattr(args, f"{stage}_lr")),
            )
            if value is not None
        }
        overrides[stage] = dataclasses.replace(plan, **changes)
    for name in ("tune_vision_lr_scale", "lm_grid_share", "checkpoint_every", "eval_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    uses_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    overrides["workers"] = (
        args.workers if args.workers is not None else (min(12, (os.cpu_count() or 2) - 1) if uses_cuda else 0)
    )
    config = dataclasses.replace(config, **overrides)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    metrics = train(config, args.out, stages, args.device)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
