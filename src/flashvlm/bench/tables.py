"""Tables (terminal and Markdown), JSON, and the marked sections of docs/performance.md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..files import write_text_atomic

MIB = 2**20


def machine_description(device: torch.device) -> dict:
    """Where the figures were measured."""
    import transformers

    description = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def machine_line(machine: dict) -> str:
    where = machine.get("gpu") or f"CPU ({machine['cpu']}, {machine['cpu_cores_visible']} cores visible)"
    return f"{where}; torch {machine['torch']}, transformers {machine['transformers']}"


def _format(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _mib(value) -> str:
    return "–" if value is None else f"{value / MIB:,.1f}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render_table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max([len(header)] + [len(row[column]) for row in rows]) for column, header in enumerate(headers)]
    lines = ["  ".join(header.rjust(width) for header, width in zip(headers, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


PREFILL_HEADERS = [
    "method",
    "budget",
    "kept",
    "LM positions",
    "vision ms",
    "selection ms",
    "LM prefill ms",
    "TTFT ms",
    "decode tok/s",
    "peak MiB",
    "KV MiB",
    "prefill GFLOPs (V+P+LM)",
    "ideal ×",
    "measured ×",
    "measured/ideal",
    "selection / unpruned prefill",
]


def prefill_table(report: dict, markdown: bool = False) -> str:
    rows = []
    for row in report["rows"]:
        flops = f"{row['flops_vision'] / 1e9:,.1f}+{row['flops_projector'] / 1e9:,.1f}+{row['flops_language_model'] / 1e9:,.1f}"
        rows.append(
            [
                row["method"],
                _format(row["budget"]),
                str(row["kept_tokens"]),
                str(row["prompt_length"]),
                _format(row["vision_ms"]),
                _format(row["selection_ms"], 2),
                _format(row["prefill_ms"]),
                _format(row["ttft_ms"]),
                _format(row["decode_tokens_per_s"]),
                _mib(row["peak_memory_bytes"]),
                _mib(row["kv_cache_bytes"]),
                flops,
                _times(row["ideal_prefill_speedup"]),
                _times(row.get("prefill_speedup")),
                _format(row.get("speedup_vs_ideal"), 2) + (" (unsteady)" if row.get("speedup_unsteady") else ""),
                _percent(row.get("selection_share_of_unpruned_prefill")),
            ]
        )
    return render_table(PREFILL_HEADERS, rows, markdown)


def prefill_header(report: dict) -> list[str]:
    model = report["model"]
    layout = f" ({model['visual_layout']})" if model.get("visual_layout") else ""  # reports before it lack it
    return [
        f"model: {model['name']} ({model['architecture']}), {model['shape']}",
        f"{model['visual_tokens']} visual{layout} + {model['text_tokens']} text tokens per row, batch {model['batch_size']}, "
        f"{model['new_tokens']} new tokens, {model['dtype']}, {model['attn_implementation']} attention, "
        f"median of {model['repeats']} runs after {model['warmup']} warm-up",
        f"measured on {machine_line(report['machine'])}",
    ]


SELECTION_HEADERS = [
    "method",
    "N",
    "K",
    "selection ms",
    "peak MiB",
    "diversity rounds",
    "diversity GFLOPs",
    "LM prefill of kept (est.) ms",
    "selection / LM prefill",
    "coverage radius (vision)",
    "coverage radius (projected)",
    "Jaccard vs release",
    "@rounds = matrix",
]


def selection_table(report: dict, markdown: bool = False) -> str:
    rows = []
    for row in report["rows"]:
        selection = _format(row["selection_ms"], 2) + (" (extrapolated)" if row["extrapolated"] else "")
        rows.append(
            [
                row["method"],
                f"{row['tokens']:,}",
                f"{row['kept']:,}",
                selection,
                _mib(row.get("peak_memory_bytes")),
                _format(row.get("diversity_rounds")),
                _format(row.get("diversity_gflops"), 2),
                _format(row["lm_prefill_of_kept_estimate_ms"]),
                _percent(row["selection_share_of_lm_prefill"]),
                _format(row.get("coverage_radius"), 3),
                _format(row.get("coverage_radius_projected"), 3),
                _format(row.get("jaccard_vs_release"), 3),
                {None: "–", True: "yes", False: "NO"}[row.get("identical_to_matrix_path")],
            ]
        )
    table = render_table(SELECTION_HEADERS, rows, markdown)
    lines = []
    for fit in report["fits"]:
        if fit["exponent"] is None:
            continue
        line = f"- {fit['method']}: time ~ N^{fit['exponent']:.2f} (fitted on N = {', '.join(f'{n:,}' for n in fit['fitted_on'])})"
        if fit.get("diversity_flops_exponent") is not None:
            line += f"; diversity FLOPs ~ N^{fit['diversity_flops_exponent']:.2f} between the two largest N"
        lines.append(line)
    return table + ("\n\ngrowth:\n" + "\n".join(lines) if lines else "")


TOWER_HEADERS = ["vision tower", "ms", "peak MiB"]

TOWER_LABELS = {
    "sdpa_to_feature_layer": "SDPA, up to the feature layer (flashvlm, no saliency)",
    "sdpa_with_saliency": "SDPA, up to the feature layer + q/k saliency (flashvlm)",
    "sdpa_full_tower": "SDPA, every layer, hidden states (stock LLaVA)",
    "eager_attention_maps": "eager, every layer, output_attentions=True (VisionZip / VisPruner)",
}


def tower_table(tower: dict, markdown: bool = False) -> str:
    rows = [
        [TOWER_LABELS[name], _format(result["ms"]), _mib(result["peak_memory_bytes"])]
        for name, result in tower["variants"].items()
    ]
    table = render_table(TOWER_HEADERS, rows, markdown)
    return table + (
        f"\n\nsaliency extraction adds {100 * tower['saliency_overhead']:+.1f} % to the SDPA tower; "
        f"full attention maps add {100 * tower['attention_maps_overhead']:+.1f} % to the stock SDPA tower "
        f"({tower['vision_tokens']} tokens per image, batch {tower['batch']})"
    )


def write_json(path: str | os.PathLike, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


PERFORMANCE_PREAMBLE = """# Performance

Every figure below comes from the command printed above its table; rerun the command
to regenerate its section (`make performance` reruns them all). Models are built from
their real configs with random weights (they time the same as trained ones). Rows
marked SCALED ran with fewer or narrower layers than the real model, to fit a CPU:
their speed-ups are indicative, not the reference.
"""
