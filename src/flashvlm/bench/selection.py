"""Selection overhead: each method's selection alone as N grows, and the vision tower
with our saliency extraction against the same tower returning full attention maps.

Selection inputs are synthetic (random features, saliency, projected tokens and text
embeddings of the model's real widths): a method's cost depends on the shapes, not
on the values.
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
from ..selection import SelectionInputs, get_method
from .flops import decoder_prefill_flops, flashvlm_diversity_flops
from .memory import peak_memory_bytes
from .models import build_model, scale_config
from .prefill import synchronizer, vision_module

#: The token counts of the issue: LLaVA-1.5, LLaVA-NeXT AnyRes, a few images, a long video.
DEFAULT_TOKEN_COUNTS = (576, 2_880, 10_000, 50_000)


def selection_inputs(
    num_tokens: int,
    vision_width: int,
    lm_width: int,
    text_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> SelectionInputs:
    """One image of ``num_tokens`` tokens with every input a method may ask for."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    side = math.isqrt(num_tokens)
    return SelectionInputs(
        features=random(1, num_tokens, vision_width),  # (1, N, C)
        saliency=torch.softmax(random(1, num_tokens).float() * 2, dim=-1),  # (1, N)
        saliency_kind="cls",
        projected=random(1, num_tokens, lm_width),  # (1, N, D)
        text_embeds=random(1, text_tokens, lm_width),  # (1, L, D)
        text_mask=torch.ones(1, text_tokens, dtype=torch.bool, device=device),
        keys=random(1, num_tokens, vision_width),  # (1, N, C)
        grid_shape=(side, side) if side * side == num_tokens else None,
    )


def median_seconds(work: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    synchronize = synchronizer(device)
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        work()
        synchronize()
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
    """Time (and peak memory of) every method at every N with K = N // 9.

    A method whose one call at some N takes longer than ``max_seconds`` is timed once
    there and not run at larger N; those rows are extrapolated and marked so: in
    proportion to the diversity step's analytic FLOPs for FlashVLM's bipartite step
    (which dominates there), else from the fitted power law.
    Returns (rows, per-method fits, skip messages).
    """
    lm_width = text_config.hidden_size
    rate = gemm_flops_per_second(lm_width, text_config.intermediate_size, 1024, device, dtype)
    rows, fits, skipped = [], [], []
    for method_name in methods:
        selector = get_method(method_name)
        measured_n, measured_s = [], []
        stop_reason = None
        last_measured_row: dict = {}
        for num_tokens in token_counts:
            num_keep = max(1, num_tokens // 9)
            lm_ms = 1000 * decoder_prefill_flops(text_config, text_tokens + num_keep) / rate
            diversity = flashvlm_diversity_flops(selector, num_tokens, num_keep, vision_width)
            row = {
                "method": method_name,
                "tokens": num_tokens,
                "kept": num_keep,
                "lm_prefill_of_kept_estimate_ms": lm_ms,
                "diversity_gflops": diversity[0] / 1e9 if diversity else None,
                "diversity_rounds": diversity[1] if diversity else None,
            }
            if stop_reason is not None:
                last = last_measured_row
                if diversity and last.get("diversity_gflops"):
                    seconds = measured_s[-1] * row["diversity_gflops"] / last["diversity_gflops"]
                else:
                    seconds = measured_s[-1] * (num_tokens / measured_n[-1]) ** (
                        fit_exponent(measured_n, measured_s) or 2.0
                    )
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
            inputs = selection_inputs(num_tokens, vision_width, lm_width, text_tokens, device, dtype)
            try:
                start = time.perf_counter()
                selector(inputs, num_keep)
                first_call = time.perf_counter() - start
            except MethodUnavailableError as error:
                skipped.append(f"{method_name}: {error}")
                break
            if first_call > max_seconds:
                seconds, note = first_call, f"one call took {first_call:.1f} s > --max-seconds {max_seconds:g}"
                stop_reason = f"not run: N={num_tokens} already took {first_call:.1f} s; extrapolated"
            else:
                seconds = median_seconds(partial(selector, inputs, num_keep), repeats, max(0, warmup - 1), device)
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
    if config.model_type != "llava":
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
