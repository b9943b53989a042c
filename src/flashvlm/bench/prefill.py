"""End-to-end benchmark: one ``generate`` per run, timed stage by stage.

A run's timeline (``time.perf_counter``, device-synchronised at every mark):

    generate called
      vision tower starts              (forward pre-hook on the tower)
      selection starts / ends          (the method's select, pruned runs only)
      language model prefill starts / ends   (PrefillTimer)
      first new token out              (streamer; generate moves it to the CPU)
      last new token out

From it: ``vision_ms`` = tower start -> selection start (pruned: tower up to the
feature layer, saliency from q/k, projection of the rows the method scores, text
embeddings) or -> prefill start (unpruned: the whole stock vision path with the
projector); ``selection_ms`` = the method's own call; ``handoff_ms`` = selection end
-> prefill start (projecting kept rows, compacting the sequence); ``prefill_ms`` =
the language model's prefill; ``ttft_ms`` = generate called -> first token;
``decode_tokens_per_s`` = batch x (new tokens - 1) / (last token - first token).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..adapters import adapter_for, supported_architectures
from ..errors import FlashVLMError, MethodUnavailableError, UnsupportedModelError
from ..patch import apply
from ..selection import Budget, get_method
from ..timing import PrefillTimer, stamped_calls, synchronize
from .flops import kv_cache_bytes
from .memory import peak_memory_bytes
from .models import SyntheticInputs, prefill_flops


def vision_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model's vision tower, as its family's adapter names it."""
    return adapter_for(model).vision_tower


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model's language model, as its family's adapter names it."""
    return adapter_for(model).language_model


class _TokenClock(BaseStreamer):
    """Times the tokens ``generate`` hands out: its first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 1:
            return
        now = time.perf_counter()  # generate moved the token to the CPU: the device is done
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def end(self) -> None:
        pass


@dataclass
class RunTimes:
    """One run's stage times in milliseconds (None where a stage did not happen)."""

    vision_ms: float | None
    selection_ms: float | None
    handoff_ms: float | None
    prefill_ms: float
    ttft_ms: float
    decode_tokens_per_s: float | None
    prompt_length: int  # positions the language model prefilled (per row, with padding)
    kept_per_image: int  # visual tokens of one row's image (or video) that reached the language model
    peak_memory_bytes: int | None


def _generate_once(model, inputs: SyntheticInputs, new_tokens: int, pruner, device) -> RunTimes:
    tower = vision_module(model)
    stamps: dict[str, float] = {}

    def tower_started(*_):
        if "vision_start" not in stamps:
            synchronize(device)
            stamps["vision_start"] = time.perf_counter()

    handles = [tower.register_forward_pre_hook(tower_started)] if tower is not None else []
    clock = _TokenClock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    selection = None
    try:
        with ExitStack() as scope:
            if pruner is not None:
                # The method's own work: its ``select``, stamped on this instance for the run.
                selection = scope.enter_context(stamped_calls(pruner.selector, "select", device))
            timer = scope.enter_context(PrefillTimer(language_model_of(model)))
            scope.enter_context(torch.no_grad())
            synchronize(device)
            called_at = time.perf_counter()
            model.generate(
                **inputs.model_kwargs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
    finally:
        for handle in handles:
            handle.remove()
    vision_start = stamps.get("vision_start")
    if selection is not None and selection.started_at is not None:
        vision_end, selection_ms = selection.started_at, 1000 * (selection.ended_at - selection.started_at)
        handoff_ms = 1000 * (timer.prefill_started_at - selection.ended_at)
    else:
        vision_end, selection_ms, handoff_ms = timer.prefill_started_at, None, None
    decode = None
    if new_tokens > 1 and clock.last_token_at > clock.first_token_at:
        decode = inputs.num_images * (new_tokens - 1) / (clock.last_token_at - clock.first_token_at)
    # Row 0's visual tokens kept, over all its budget units (one per image, or one per video frame).
    kept = inputs.visual_tokens_per_image
    if pruner is not None:
        kept = sum(unit.num_kept for unit in pruner.last.images if unit.batch_index == 0)
    return RunTimes(
        vision_ms=1000 * (vision_end - vision_start) if vision_start is not None else None,
        selection_ms=selection_ms,
        handoff_ms=handoff_ms,
        prefill_ms=1000 * timer.prefill_seconds,
        ttft_ms=1000 * (clock.first_token_at - called_at),
        decode_tokens_per_s=decode,
        prompt_length=timer.prefill_length or 0,
        kept_per_image=kept,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


#: A case whose prefill repeats spread wider than this share of their median (or whose
#: baseline's do) gets its measured/ideal ratio flagged: the machine was not steady.
UNSTEADY_SPREAD = 0.25


def _spread(values: list[float]) -> float:
    """Interquartile range / median of the repeats (0 for one run): the spread of the middle
    half, as robust to one outlier as the median the figures report."""
    if len(values) < 2:
        return 0.0
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return (upper - lower) / statistics.median(values)


@dataclass
class Case:
    """One row of the benchmark: a method at a budget, or the unpruned model (method None)."""

    method: str | None
    budget: Budget | None
    runs: list[RunTimes] = field(default_factory=list)
    cpu_peak_memory_bytes: int | None = None

    @property
    def label(self) -> str:
        return "unpruned" if self.method is None else f"{self.method} @ {self.budget}"


def measure_case(
    model,
    inputs: SyntheticInputs,
    method: str | None,
    budget: Budget | None,
    *,
    repeats: int,
    warmup: int,
    new_tokens: int,
    device: torch.device,
    measure_cpu_memory: bool,
) -> Case:
    """Warm-up runs, then ``repeats`` timed runs of one case (a pruner attached for its duration)."""
    case = Case(method, budget)
    pruner = apply(model, budget, method) if method is not None else None
    try:
        for _ in range(warmup):
            _generate_once(model, inputs, new_tokens, pruner, device)
        for _ in range(repeats):
            case.runs.append(_generate_once(model, inputs, new_tokens, pruner, device))
        if measure_cpu_memory and device.type == "cpu":
            case.cpu_peak_memory_bytes = peak_memory_bytes(
                lambda: _generate_once(model, inputs, new_tokens, pruner, device), device
            )
    finally:
        if pruner is not None:
            pruner.remove()
    return case


def summarise(case: Case, baseline: Case | None, config, inputs: SyntheticInputs, dtype: torch.dtype) -> dict:
    """Medians of a case, its analytic FLOPs, KV-cache bytes and speed-ups against the baseline."""
    runs = case.runs
    visual, text = inputs.visual_tokens_per_image, inputs.text_tokens
    kept = runs[0].kept_per_image
    scores_projected = case.method is not None and "projected" in get_method(case.method).requires
    flops = prefill_flops(config, text, visual, kept, inputs.num_images, visual if scores_projected else None)
    full = prefill_flops(config, text, visual, visual, inputs.num_images)
    prompt_length = runs[0].prompt_length
    peak = _median([run.peak_memory_bytes for run in runs])
    row = {
        "method": case.method or "unpruned",
        "budget": case.budget,
        "visual_tokens": visual,
        "kept_tokens": kept,
        "prompt_length": prompt_length,
        "vision_ms": _median([run.vision_ms for run in runs]),
        "selection_ms": _median([run.selection_ms for run in runs]),
        "handoff_ms": _median([run.handoff_ms for run in runs]),
        "prefill_ms": _median([run.prefill_ms for run in runs]),
        "ttft_ms": _median([run.ttft_ms for run in runs]),
        "decode_tokens_per_s": _median([run.decode_tokens_per_s for run in runs]),
        "peak_memory_bytes": int(peak) if peak is not None else case.cpu_peak_memory_bytes,
        "peak_memory_source": "cuda_max_allocated"
        if peak is not None
        else ("cpu_live_tensors" if case.cpu_peak_memory_bytes is not None else None),
        "kv_cache_bytes": kv_cache_bytes(config.text_config, prompt_length, inputs.num_images, dtype),
        "flops_vision": flops.vision,
        "flops_projector": flops.projector,
        "flops_language_model": flops.language_model,
        "flops_total": flops.total,
        "ideal_prefill_speedup": full.language_model / flops.language_model,
        "ideal_total_speedup": full.total / flops.total,
        "repeats": len(runs),
        "prefill_spread": _spread([run.prefill_ms for run in runs]),
    }
    if baseline is not None and baseline.runs:
        base_prefill = _median([run.prefill_ms for run in baseline.runs])
        base_ttft = _median([run.ttft_ms for run in baseline.runs])
        row["prefill_speedup"] = base_prefill / row["prefill_ms"]
        row["speedup_vs_ideal"] = row["prefill_speedup"] / row["ideal_prefill_speedup"]
        spread = max(row["prefill_spread"], _spread([run.prefill_ms for run in baseline.runs]))
        row["speedup_unsteady"] = spread > UNSTEADY_SPREAD
        row["ttft_speedup"] = base_ttft / row["ttft_ms"]
        if row["selection_ms"] is not None:
            row["selection_share_of_unpruned_prefill"] = row["selection_ms"] / base_prefill
    return row


def pruning_support(model) -> str | None:
    """None if flashvlm can prune ``model``, else the reason (for a skip message)."""
    try:
        adapter_for(model)
    except UnsupportedModelError:
        return (
            f"no flashvlm adapter for {type(model).__name__} in this build "
            f"(supported: {', '.join(supported_architectures())}); only the unpruned model was measured"
        )
    return None


def run_prefill_benchmark(
    model,
    config,
    inputs: SyntheticInputs,
    methods: list[str],
    budgets: list[Budget],
    *,
    repeats: int,
    warmup: int,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    measure_cpu_memory: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[list[dict], list[str]]:
    """The unpruned model, then every method at every budget. Returns (rows, skip messages)."""
    skipped: list[str] = []
    settings = dict(
        repeats=repeats, warmup=warmup, new_tokens=new_tokens, device=device, measure_cpu_memory=measure_cpu_memory
    )
    progress("unpruned")
    baseline = measure_case(model, inputs, None, None, **settings)
    rows = [summarise(baseline, baseline, config, inputs, dtype)]
    reason = pruning_support(model)
    if reason is not None:
        return rows, [reason]
    for method in methods:
        for budget in budgets:
            progress(f"{method} @ {budget}")
            try:
                case = measure_case(model, inputs, method, budget, **settings)
            except MethodUnavailableError as error:
                skipped.append(f"{method}: {error}")
                break
            except FlashVLMError as error:
                skipped.append(f"{method} @ {budget}: {error}")
                continue
            rows.append(summarise(case, baseline, config, inputs, dtype))
    return rows, skipped
