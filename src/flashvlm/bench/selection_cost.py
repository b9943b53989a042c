"""Selection overhead: each method's selection alone as N grows, and the vision tower
with our saliency extraction against the same tower returning full attention maps.

Selection inputs are synthetic (random features, saliency and text embeddings of the
model's real widths): a method's cost depends on the shapes, not on the values. The
features are drawn around N / 32 random centres, and the projected tokens and keys are
those features through maps as a model has them (a random two-layer GELU projector, as
LLaVA's; a random linear key projection), so every space a method may select in holds the
same tokens. What a method keeps can then be judged: its coverage radius (largest cosine
distance from any token to the nearest kept one) in the vision features and in the
projected tokens (DivPrune and CDPruner select in the latter), and its Jaccard agreement
with ``flashvlm:release``.

A method name ending in ``@rounds`` runs the method with the bipartite diversity step
computed round by round, as the release does and as flashvlm did before its similarity
matrix: the side-by-side reference for that speed-up (the kept tokens must not change).
The bench registers that way as a diversity rule of its own and sets the method's
``diversity`` option to it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from ..adapters import adapter_for
from ..errors import FlashVLMError, MethodUnavailableError, UnsupportedModelError
from ..saliency import query_row_attention
from ..selection import SelectionInputs, TokenSelector, get_method
from ..selection.diversity import MAX_MATRIX_CANDIDATES, bipartite_by_rounds, register_diversity_rule
from ..selection.ops import unit_rows
from ..timing import synchronize
from .flops import decoder_prefill_flops, flashvlm_diversity_flops
from .measures import coverage_radius, jaccard_agreement
from .memory import peak_memory_bytes
from .models import build_model, family_of, scale_config
from .prefill import vision_module

#: The token counts of the issue: LLaVA-1.5, LLaVA-NeXT AnyRes, a few images, a long video.
DEFAULT_TOKEN_COUNTS = (576, 2_880, 10_000, 50_000)
#: Suffix of a method name: the same method, its bipartite step computed round by round.
ROUND_BY_ROUND_SUFFIX = "@rounds"
#: The diversity rule an ``@rounds`` method runs: bipartite removal without the similarity matrix.
ROUND_BY_ROUND_RULE = "bipartite_by_rounds"
register_diversity_rule(ROUND_BY_ROUND_RULE, bipartite_by_rounds)
#: The method whose kept set every method's is compared with (Jaccard).
REFERENCE_METHOD = "flashvlm:release"
#: A call predicted to take this many times ``max_seconds`` is not made (extrapolated instead).
PREDICTION_LIMIT = 10


def _reference_is_cheap(num_tokens: int, num_keep: int) -> bool:
    """Whether :data:`REFERENCE_METHOD` avoids re-multiplying a long list every round at this N."""
    reference = get_method(REFERENCE_METHOD)
    num_candidates = num_tokens - math.floor(reference.important_ratio * num_keep)
    return reference.diversity_block is not None or num_candidates <= MAX_MATRIX_CANDIDATES


def bench_method(name: str) -> tuple[TokenSelector, bool]:
    """The selector for ``NAME[:PRESET][@rounds]`` and whether its bipartite step runs round by round.

    ``@rounds`` needs a method whose ``diversity`` option is "bipartite" (flashvlm and its
    presets); it sets that option to :data:`ROUND_BY_ROUND_RULE`.
    """
    selector = get_method(name.removesuffix(ROUND_BY_ROUND_SUFFIX))
    if not name.endswith(ROUND_BY_ROUND_SUFFIX):
        return selector, False
    diversity = getattr(selector, "diversity", None)
    if diversity != "bipartite":
        has = f"its diversity is {diversity!r}" if diversity else "it has no diversity option"
        raise FlashVLMError(f"{name}: {ROUND_BY_ROUND_SUFFIX} needs a method whose diversity is 'bipartite'; {has}")
    return get_method(selector, diversity=ROUND_BY_ROUND_RULE), True


def selection_inputs(
    num_tokens: int,
    vision_width: int,
    lm_width: int,
    text_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> SelectionInputs:
    """One image of ``num_tokens`` tokens with every input a method may ask for.

    The projected tokens and keys are computed from the features (in float32, on ``device``),
    so a method that selects among projected tokens (DivPrune, CDPruner) or keys sees the
    same clusters as one that selects among the features.
    """
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device)  # float32

    side = math.isqrt(num_tokens)
    centres = random(1, max(1, num_tokens // 32), vision_width)  # (1, N / 32, C)
    membership = torch.randint(0, centres.shape[1], (num_tokens,), generator=generator).to(device)
    features = centres[:, membership] + 0.5 * random(1, num_tokens, vision_width)  # (1, N, C)
    # Weights scaled by 1 / sqrt(fan-in), as a freshly initialised layer's.
    projector_in = random(vision_width, lm_width) / math.sqrt(vision_width)  # (C, D)
    projector_out = random(lm_width, lm_width) / math.sqrt(lm_width)  # (D, D)
    key_projection = random(vision_width, vision_width) / math.sqrt(vision_width)  # (C, C)
    projected = torch.nn.functional.gelu(features @ projector_in) @ projector_out  # (1, N, D)
    return SelectionInputs(
        features=features.to(dtype),
        saliency=torch.softmax(random(1, num_tokens) * 2, dim=-1),  # (1, N)
        saliency_kind="cls",
        projected=projected.to(dtype),
        text_embeds=random(1, text_tokens, lm_width).to(dtype),  # (1, L, D)
        text_mask=torch.ones(1, text_tokens, dtype=torch.bool, device=device),
        keys=(features @ key_projection).to(dtype),  # (1, N, C)
        grid_shape=(side, side) if side * side == num_tokens else None,
    )


def median_seconds(work: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_exponent(token_counts: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(N): time ~ N^slope. None with < 2 points."""
    if len(token_counts) < 2:
        return None
    xs = [math.log(n) for n in token_counts]
    ys = [math.log(max(s, 1e-9)) for s in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def gemm_flops_per_second(width: int, inner: int, rows: int, device: torch.device, dtype: torch.dtype) -> float:
    """Measured rate of an LM-shaped matmul (rows x width) @ (width x inner) on this device."""
    left = torch.randn(rows, width, device=device, dtype=dtype)
    right = torch.randn(width, inner, device=device, dtype=dtype)
    seconds = median_seconds(lambda: left @ right, repeats=3, warmup=1, device=device)
    return 2 * rows * width * inner / seconds


def selection_scaling(
    methods: list[str],
    token_counts: list[int],
    text_config,
    vision_width: int,
    *,
    text_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    max_seconds: float,
    measure_memory: bool,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[list[dict], list[dict], list[str]]:
    """Time (and peak memory of) every method at every N with K = N // 9, and measure what
    it keeps: coverage radius among the vision features and among the projected tokens,
    Jaccard agreement with ``flashvlm:release``, and for an ``@rounds`` method whether it
    keeps exactly what the method without the suffix keeps.

    A method whose one call at some N takes longer than ``max_seconds`` is timed once
    there and not run at larger N, nor where a call is predicted to take more than
    :data:`PREDICTION_LIMIT` x ``max_seconds``; those rows are extrapolated and marked
    so: in proportion to the diversity step's analytic FLOPs for FlashVLM's bipartite
    step (which dominates there), else from the fitted power law. Jaccard agreement is
    left out where the reference itself would run round by round (very long lists).
    Returns (rows, per-method fits, skip messages).
    """
    lm_width = text_config.hidden_size
    rate = gemm_flops_per_second(lm_width, text_config.intermediate_size, 1024, device, dtype)
    rows, fits, skipped = [], [], []
    kept_sets: dict[tuple[str, int], torch.Tensor] = {}
    # Every method at one N sees the same inputs, built once: (inputs, unit features, unit projected tokens).
    inputs_by_count: dict[int, tuple[SelectionInputs, torch.Tensor, torch.Tensor]] = {}

    def inputs_for(num_tokens: int) -> tuple[SelectionInputs, torch.Tensor, torch.Tensor]:
        if num_tokens not in inputs_by_count:
            inputs = selection_inputs(num_tokens, vision_width, lm_width, text_tokens, device, dtype)
            unit_spaces = (unit_rows(inputs.features.float()), unit_rows(inputs.projected.float()))  # (1, N, C/D)
            inputs_by_count[num_tokens] = (inputs, *unit_spaces)
        return inputs_by_count[num_tokens]

    def kept_by(name: str, inputs: SelectionInputs, num_keep: int) -> torch.Tensor:
        """The kept indices of ``name`` at this N, computed once per (method, N)."""
        key = (name, inputs.num_tokens)
        if key not in kept_sets:
            kept_sets[key] = bench_method(name)[0](inputs, num_keep).indices
        return kept_sets[key]

    for method_name in methods:
        selector, round_by_round = bench_method(method_name)
        measured_n, measured_s = [], []
        stop_reason = None
        last_measured_row: dict = {}
        for num_tokens in token_counts:
            num_keep = max(1, num_tokens // 9)
            lm_ms = 1000 * decoder_prefill_flops(text_config, text_tokens + num_keep) / rate
            diversity = flashvlm_diversity_flops(selector, num_tokens, num_keep, vision_width, round_by_round)
            row = {
                "method": method_name,
                "tokens": num_tokens,
                "kept": num_keep,
                "lm_prefill_of_kept_estimate_ms": lm_ms,
                "diversity_gflops": diversity[0] / 1e9 if diversity else None,
                "diversity_rounds": diversity[1] if diversity else None,
                "coverage_radius": None,
                "coverage_radius_projected": None,
                "jaccard_vs_release": None,
                "identical_to_matrix_path": None,
            }
            if measured_n:
                last = last_measured_row
                if diversity and last.get("diversity_gflops"):
                    predicted = measured_s[-1] * row["diversity_gflops"] / last["diversity_gflops"]
                else:
                    predicted = measured_s[-1] * (num_tokens / measured_n[-1]) ** (
                        fit_exponent(measured_n, measured_s) or 2.0
                    )
                if stop_reason is None and predicted > PREDICTION_LIMIT * max_seconds:
                    stop_reason = (
                        f"not run: predicted {predicted:.0f} s > {PREDICTION_LIMIT} x --max-seconds; extrapolated"
                    )
            if stop_reason is not None:
                seconds = predicted
                rows.append(
                    {
                        **row,
                        "selection_ms": 1000 * seconds,
                        "extrapolated": True,
                        "note": stop_reason,
                        "selection_share_of_lm_prefill": 1000 * seconds / lm_ms,
                    }
                )
                continue
            progress(f"{method_name} N={num_tokens}")
            inputs, unit_features, unit_projected = inputs_for(num_tokens)
            try:
                start = time.perf_counter()
                keep = selector(inputs, num_keep).indices  # (1, K)
                first_call = time.perf_counter() - start
            except MethodUnavailableError as error:
                skipped.append(f"{method_name}: {error}")
                break
            kept_sets.setdefault((method_name, num_tokens), keep)
            row["coverage_radius"] = coverage_radius(unit_features, keep).item()
            row["coverage_radius_projected"] = coverage_radius(unit_projected, keep).item()
            if _reference_is_cheap(num_tokens, num_keep):
                reference = kept_by(REFERENCE_METHOD, inputs, num_keep)
                row["jaccard_vs_release"] = jaccard_agreement(keep, reference, num_tokens).item()
            if round_by_round:
                matrix_path = kept_by(method_name.removesuffix(ROUND_BY_ROUND_SUFFIX), inputs, num_keep)
                row["identical_to_matrix_path"] = torch.equal(keep, matrix_path)
            if first_call > max_seconds:
                seconds, note = first_call, f"one call took {first_call:.1f} s > --max-seconds {max_seconds:g}"
                stop_reason = f"not run: N={num_tokens} already took {first_call:.1f} s; extrapolated"
            else:
                work = partial(selector, inputs, num_keep)
                seconds = median_seconds(work, repeats, max(0, warmup - 1), device)
                note = None
            memory = None
            if measure_memory and stop_reason is None:
                memory = peak_memory_bytes(partial(selector, inputs, num_keep), device)
            measured_n.append(num_tokens)
            measured_s.append(seconds)
            last_measured_row = {
                **row,
                "selection_ms": 1000 * seconds,
                "extrapolated": False,
                "note": note,
                "peak_memory_bytes": memory,
                "selection_share_of_lm_prefill": 1000 * seconds / lm_ms,
            }
            rows.append(last_measured_row)
        if measured_n:
            method_rows = [row for row in rows if row["method"] == method_name and row["diversity_gflops"]]
            fits.append(
                {
                    "method": method_name,
                    "exponent": fit_exponent(measured_n, measured_s),
                    "fitted_on": measured_n,
                    "diversity_flops_exponent": fit_exponent(
                        [row["tokens"] for row in method_rows[-2:]],
                        [row["diversity_gflops"] for row in method_rows[-2:]],
                    ),
                }
            )
    return rows, fits, skipped


def tower_saliency_overhead(
    config,
    scale: dict,
    *,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    measure_memory: bool,
) -> dict:
    """The vision tower four ways, on ``batch`` random images:

    - ``sdpa_to_feature_layer``: SDPA tower up to the feature layer (what flashvlm runs for
      methods without saliency);
    - ``sdpa_with_saliency``: the same plus our saliency (q/k hooks on the feature layer,
      one attention row);
    - ``sdpa_full_tower``: the stock LLaVA path (SDPA, every layer, all hidden states);
    - ``eager_attention_maps``: every layer in eager attention returning its attention maps
      (``output_attentions=True``), what VisionZip and VisPruner ask for.
    Only the tower is measured: the language model is built one tiny layer wide.
    LLaVA-1.5 (CLIP tower, CLS saliency) only; other families raise UnsupportedModelError.
    """
    if not family_of(config).compares_tower:
        raise UnsupportedModelError(
            f"the tower comparison covers LLaVA-1.5 CLIP towers; {config.architectures[0]} is not one"
        )
    tower_config = scale_config(copy.deepcopy(config), {**scale, "lm_layers": 1})
    tower_config.text_config.hidden_size = 64
    tower_config.text_config.intermediate_size = 64
    tower_config.text_config.num_attention_heads = 1
    tower_config.text_config.num_key_value_heads = 1
    tower_config.text_config.head_dim = 64
    tower_config.text_config.vocab_size = max(tower_config.text_config.vocab_size, 1)
    model = build_model(tower_config, device, dtype)
    adapter = adapter_for(model)
    vision = tower_config.vision_config
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    layer, strategy = tower_config.vision_feature_layer, tower_config.vision_feature_select_strategy
    attention = adapter.vision_layers[0].self_attn
    tower = vision_module(model)

    def features_only():
        return adapter.encode_images(pixels, layer, strategy, need_qk=False)[0]

    def with_saliency():
        features, queries, keys = adapter.encode_images(pixels, layer, strategy, need_qk=True)
        return features, query_row_attention(queries, keys, attention.num_heads, 0, attention.scale)

    def full_tower():
        return tower(pixels, output_hidden_states=True).hidden_states[layer]

    def attention_maps():
        output = tower(pixels, output_hidden_states=True, output_attentions=True)
        if not output.attentions:
            raise FlashVLMError("the tower returned no attention maps with output_attentions=True")
        return output.hidden_states[layer], output.attentions

    variants = {
        "sdpa_to_feature_layer": (features_only, "sdpa"),
        "sdpa_with_saliency": (with_saliency, "sdpa"),
        "sdpa_full_tower": (full_tower, "sdpa"),
        "eager_attention_maps": (attention_maps, "eager"),
    }
    # Round-robin over the variants, so drifting load on a shared machine hits all alike.
    times: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, int | None] = {name: None for name in variants}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, (work, implementation) in variants.items():
                tower.set_attn_implementation(implementation)
                try:
                    seconds = median_seconds(work, repeats=1, warmup=0, device=device)
                    if measure_memory and round_index == 0:
                        memory[name] = peak_memory_bytes(work, device)
                finally:
                    tower.set_attn_implementation("sdpa")
                if round_index >= warmup:
                    times[name].append(seconds)
    results = {
        name: {"ms": 1000 * statistics.median(times[name]), "peak_memory_bytes": memory[name]} for name in variants
    }
    base = results["sdpa_to_feature_layer"]["ms"]
    full = results["sdpa_full_tower"]["ms"]
    return {
        "variants": results,
        "saliency_overhead": results["sdpa_with_saliency"]["ms"] / base - 1.0,
        "attention_maps_overhead": results["eager_attention_maps"]["ms"] / full - 1.0,
        "batch": batch,
        "vision_tokens": (vision.image_size // vision.patch_size) ** 2 + 1,
    }
