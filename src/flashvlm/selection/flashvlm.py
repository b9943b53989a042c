"""FlashVLM: text-guided visual token selection (Cai, Zhang et al., 2025).

Steps 1-7 of docs/flashvlm.md. The defaults follow the authors' released LLaVA code;
every constant is a named, validated field, and every place where the release differs
from the paper, or where we deviate from the release, is a named option (docs/flashvlm.md
gives each difference and its measured size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import FlashVLMError, MethodUnavailableError
from .base import (
    Selection,
    SelectionInputs,
    TokenSelector,
    check_choice,
    check_integer,
    check_range,
    register,
    requirements_with_arithmetic,
)
from .diversity import DIVERSITY_RULES, important_and_diverse
from .ops import masked_max_pool, masked_mean_pool, masked_softmax_pool, minmax, unit_rows


def text_relevance(
    projected: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    aggregation: str = "softmax",
    aggregation_temperature: float = 0.05,
    text_norm_gate: str = "off",
) -> torch.Tensor:
    """Steps 1-2: cosine of each projected token to the text, pooled over text tokens.

    projected: (B, N, D); text_embeds: (B, L, D); text_mask: (B, L) bool -> (B, N).
    """
    text_unit = unit_rows(text_embeds)  # (B, L, D)
    if text_norm_gate != "off":
        # Favour content words, whose embeddings tend to be longer than function words'.
        # "after_normalization" is where the release computes it (lengths are then ~1).
        lengths = (text_unit if text_norm_gate == "after_normalization" else text_embeds).norm(dim=-1)  # (B, L)
        longest = lengths.masked_fill(~text_mask, 0.0).amax(dim=-1, keepdim=True)
        text_unit = text_unit * (lengths / (longest + 1e-6)).unsqueeze(-1)
    similarity = unit_rows(projected) @ text_unit.transpose(-1, -2)  # (B, N, L)
    if aggregation == "softmax":
        return masked_softmax_pool(similarity, text_mask, aggregation_temperature)
    if aggregation == "max":
        return masked_max_pool(similarity, text_mask)
    return masked_mean_pool(similarity, text_mask)


def sharpen(
    relevance: torch.Tensor,
    temperature: float = 0.01,
    power: float = 2.5,
    top_fraction: float = 0.005,
    suppression: float = 0.1,
    mode: str = "release",
) -> torch.Tensor:
    """Step 3: temperature-controlled sharpening over image tokens. (B, N) -> (B, N) in [0, 1].

    The quantile and everything after it run in float32, as in the release.
    """
    sharpened = torch.softmax(relevance / temperature, dim=-1)
    if mode == "softmax":
        return minmax(sharpened.float())
    sharpened = minmax(sharpened**power).float()
    threshold = torch.quantile(sharpened, 1.0 - top_fraction, dim=-1, keepdim=True)
    sharpened = torch.where(sharpened >= threshold, sharpened, sharpened * suppression)
    return minmax(sharpened)


def log_fusion(saliency: torch.Tensor, text_score: torch.Tensor, text_weight: float, eps: float = 1e-6) -> torch.Tensor:
    """Step 4: ``minmax(exp((1 - eta) log max(minmax(a), eps) + eta log max(t, eps)))``, (B, N)."""
    saliency_term = minmax(saliency).clamp(min=eps).log()
    text_term = text_score.clamp(min=eps).log()
    return minmax(torch.exp((1.0 - text_weight) * saliency_term + text_weight * text_term))


@register
@dataclass
class FlashVLM(TokenSelector):
    """Text-guided selection: relevance to the prompt x encoder saliency, plus diverse context.

    Source: Cai, Zhang et al., "FlashVLM: Text-Guided Visual Token Selection for Large
    Multimodal Models", arXiv 2512.20561 (2025); released code CaiKaitong/FlashVLM.
    Needs: saliency, the prompt's text embeddings and the projected tokens.
    Cost per image: O(N*L*D) for relevance, O(N log N) for the ranking, and the
    bipartite diversity step O(R^2 C) for the candidates' similarity matrix once, then
    about (N-K)/removal_step rounds of O(R) scans (quadratic in N, O(R^2) memory; the
    released rule, same kept tokens). ``removal_fraction`` and ``diversity_block`` (preset
    ``fast_diversity``) bring the diversity step to O(log N) rounds of O(R * block * C):
    near N log N with O(N * block) memory, for long videos (N in the tens of thousands).
    """

    name: ClassVar[str] = "flashvlm"
    requires: ClassVar[frozenset[str]] = frozenset({"saliency", "text", "projected"})
    presets: ClassVar[dict[str, dict]] = {
        "default": {},
        # Bit-for-bit the released LLaVA selection: the CLS row as the release's tower
        # computes it (transformers 4.37.2's eager attention, in the tower's dtype), the
        # norm gate where the release computes it, steps 1-4 in the model's dtype as the
        # release runs them, and torch's default (unstable) sort for ranking ties.
        "release": {
            "text_norm_gate": "after_normalization",
            "score_dtype": "model",
            "stable_ranking": False,
            "saliency_arithmetic": "release",
        },
        # Bit-for-bit the released Qwen2.5-VL selection: only the text before the first
        # image, the norm gate on raw embedding lengths, diversity on the merger's outputs,
        # the model's dtype and torch's default sort.
        "release_qwen": {
            "text_tokens": "before_image",
            "text_norm_gate": "on",
            "diversity_space": "projected",
            "score_dtype": "model",
            "stable_ranking": False,
        },
        "text_only": {"text_weight": 1.0},
        "saliency_only": {"text_weight": 0.0},
        "no_diversity": {"important_ratio": 1.0},
        "hard_max": {"aggregation": "max"},
        "mean_text": {"aggregation": "mean"},
        "plain_softmax": {"sharpening": "softmax"},
        "max_min_diversity": {"diversity": "max_min"},
        "kmeans_diversity": {"diversity": "kmeans"},
        # Near N log N diversity for long inputs (videos): a quarter of the surplus per
        # round and redundancy within blocks of 1,024 list places. The same rule applied
        # more coarsely, so the kept set differs from the release's.
        "fast_diversity": {"removal_fraction": 0.25, "diversity_block": 1024},
        # The paper's text variant: relevance to the user's own words only (no system
        # prompt, role words or template punctuation); needs tokenizer= and question=.
        "question": {"text_tokens": "question"},
    }

    #: eta: weight of text relevance against saliency in the log-domain fusion.
    text_weight: float = 0.5
    #: tau_agg: temperature of the soft maximum over text tokens.
    aggregation_temperature: float = 0.05
    #: How relevance is pooled over text tokens: "softmax" (soft max), "max" or "mean".
    aggregation: Literal["softmax", "max", "mean"] = "softmax"
    #: tau: temperature of the softmax over image tokens in the sharpening step.
    sharpening_temperature: float = 0.01
    #: gamma: exponent applied to the sharpened relevance.
    sharpening_power: float = 2.5
    #: p: share of image tokens that keep their sharpened relevance; the rest are suppressed.
    top_fraction: float = 0.005
    #: Factor applied to relevance below the (1 - p) quantile.
    suppression: float = 0.1
    #: "release" (softmax, power, top-p suppression) or "softmax" (plain temperature softmax).
    sharpening: Literal["release", "softmax"] = "release"
    #: rho: share of the budget filled by the top-scored tokens; the rest is the diverse set.
    important_ratio: float = 0.5
    #: r: most redundant tokens removed per round of the bipartite diversity step.
    removal_step: int = 8
    #: Share of the surplus removed per bipartite round (O(log N) rounds); None removes
    #: ``removal_step`` per round as released (about (N - K) / removal_step rounds).
    removal_fraction: float | None = None
    #: Bipartite redundancy within blocks of this many consecutive list places (even,
    #: >= 2): O(R * block) time and memory per round; None compares whole lists (released).
    diversity_block: int | None = None
    #: Diversity step on the rest: "bipartite" (released), "max_min" (DivPrune-style),
    #: "kmeans" (one representative per spherical k-means cluster, 10 Lloyd steps), or a
    #: rule added with :func:`flashvlm.selection.diversity.register_diversity_rule`.
    diversity: str = "bipartite"
    #: Features the diversity step compares: "vision" (LLaVA release) or "projected" (Qwen release).
    diversity_space: Literal["vision", "projected"] = "vision"
    #: Text norm gate: "off" (default), "on" (scale by raw embedding length), or
    #: "after_normalization" (where the release computes it: numerically almost a no-op).
    text_norm_gate: Literal["off", "on", "after_normalization"] = "off"
    #: Dtype of steps 1-4 and of the diversity features: "float32" (default; in fp16,
    #: t**gamma underflows to 0 for most tokens) or "model" (release: the model's dtype
    #: up to the quantile, float32 after it).
    score_dtype: Literal["float32", "model"] = "float32"
    #: epsilon: floor before the logarithms of the fusion.
    eps: float = 1e-6
    #: Break exact ties in rankings by position (True, the same on every device), or as
    #: torch's default sort does on the current device (False, as the release does).
    stable_ranking: bool = True
    #: Text that guides relevance: "prompt" (every prompt token but the visual
    #: placeholders, as the LLaVA release), "question" (only the user's question; the
    #: adapter finds its tokens, see ``flashvlm.prune(..., tokenizer=)``) or "before_image"
    #: (only the tokens before the first visual placeholder, as the Qwen release; with the
    #: usual image-first chat layout that is the system prompt, never the question; needs
    #: ``SelectionInputs.text_before_image``, which the adapters fill).
    text_tokens: Literal["prompt", "question", "before_image"] = "prompt"
    #: How the adapter computes the saliency: "float32" (from the hooked queries and keys
    #: in float32, the default) or "release" (as the LLaVA release's tower does: transformers
    #: 4.37.2's eager CLIP attention in the tower's dtype, q scaled before the product, heads
    #: averaged in that dtype; on adapters that know no release arithmetic, as "float32").
    saliency_arithmetic: Literal["float32", "release"] = "float32"

    def __post_init__(self) -> None:
        check_range("text_weight", self.text_weight, 0.0, 1.0)
        check_range("important_ratio", self.important_ratio, 0.0, 1.0)
        check_range("top_fraction", self.top_fraction, 0.0, 1.0, low_open=True)
        check_range("suppression", self.suppression, 0.0, 1.0)
        check_range("eps", self.eps, 0.0, 1.0, low_open=True)
        for name in ("aggregation_temperature", "sharpening_temperature", "sharpening_power"):
            check_range(name, getattr(self, name), 0.0, math.inf, low_open=True)
        check_integer("removal_step", self.removal_step, 1)
        if self.removal_fraction is not None:
            check_range("removal_fraction", self.removal_fraction, 0.0, 1.0, low_open=True)
        block = self.diversity_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2):
            raise FlashVLMError(f"diversity_block must be None or an even integer >= 2; got {block!r}")
        check_choice("aggregation", self.aggregation, ("softmax", "max", "mean"))
        check_choice("sharpening", self.sharpening, ("release", "softmax"))
        check_choice("diversity", self.diversity, tuple(DIVERSITY_RULES))
        check_choice("diversity_space", self.diversity_space, ("vision", "projected"))
        check_choice("text_norm_gate", self.text_norm_gate, ("off", "on", "after_normalization"))
        check_choice("score_dtype", self.score_dtype, ("float32", "model"))
        check_choice("stable_ranking", self.stable_ranking, (True, False))
        check_choice("text_tokens", self.text_tokens, ("prompt", "question", "before_image"))
        self.requires = requirements_with_arithmetic(type(self).requires, self.saliency_arithmetic)

    def scores(self, inputs: SelectionInputs) -> torch.Tensor:
        """Fused FlashVLM score of every token (steps 1-4), float32 (B, N) in [0, 1]."""
        projected, text_embeds, saliency = inputs.projected, inputs.text_embeds, inputs.saliency
        if self.score_dtype == "float32":
            projected, text_embeds, saliency = projected.float(), text_embeds.float(), saliency.float()
        else:
            # The release's attention map leaves the tower in the model's dtype, and its
            # min-max and logarithm run there (saliency_arithmetic="release" computes it in
            # that dtype already; float32 saliency is rounded to it).
            text_embeds, saliency = text_embeds.to(projected.dtype), saliency.to(projected.dtype)
        relevance = text_relevance(
            projected,
            text_embeds,
            self.text_mask(inputs),
            self.aggregation,
            self.aggregation_temperature,
            self.text_norm_gate,
        )
        text_score = sharpen(
            relevance,
            self.sharpening_temperature,
            self.sharpening_power,
            self.top_fraction,
            self.suppression,
            self.sharpening,
        )
        return log_fusion(saliency, text_score, self.text_weight, self.eps).float()

    def text_mask(self, inputs: SelectionInputs) -> torch.Tensor:
        """(B, L) bool: the text tokens that guide relevance under ``text_tokens`` (for
        "question", the adapter has already narrowed ``text_mask`` to the question)."""
        if self.text_tokens != "before_image":
            return inputs.text_mask
        if inputs.text_before_image is None:
            raise MethodUnavailableError(
                "flashvlm with text_tokens='before_image' needs text_before_image (which prompt tokens "
                "precede the first image), which this model's adapter does not provide"
            )
        return inputs.text_mask & inputs.text_before_image

    def select(self, inputs: SelectionInputs, num_keep: int) -> Selection:
        ranking = self.scores(inputs).argsort(dim=-1, descending=True, stable=self.stable_ranking)  # (B, N)
        space = inputs.features if self.diversity_space == "vision" else inputs.projected
        unit_space = unit_rows(space if self.score_dtype == "model" else space.float())
        keep = important_and_diverse(
            ranking,
            unit_space,
            num_keep,
            self.important_ratio,
            self.diversity,
            removal_step=self.removal_step,
            stable=self.stable_ranking,
            removal_fraction=self.removal_fraction,
            block_size=self.diversity_block,
        )
        return Selection(keep)
