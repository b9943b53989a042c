"""``flashvlm bench-selection``: each method's selection alone as N grows, and the cost of
saliency in the vision tower (ours vs full attention maps)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..bench.models import SHIPPED_CONFIGS, describe_shape, family_of, load_config, parse_scale, scale_config
from ..bench.selection_cost import DEFAULT_TOKEN_COUNTS, bench_method, selection_scaling, tower_saliency_overhead
from ..bench.tables import (
    PERFORMANCE_PREAMBLE,
    machine_description,
    machine_line,
    selection_table,
    tower_table,
    write_json,
)
from ..errors import FlashVLMError, UnsupportedModelError
from ..files import update_markdown_section
from ..loading import resolve_device, resolve_dtype
from ..selection import available_methods
from .bench import add_common_bench_arguments, apply_common_settings
from .common import check_count


def default_methods() -> list[str]:
    """Every registered method; next to FlashVLM's default its release preset, its
    near-N-log-N diversity preset, and both exact ones timed round by round (``@rounds``)."""
    methods = available_methods()
    if "flashvlm" in methods:
        extra = ["flashvlm@rounds", "flashvlm:release", "flashvlm:release@rounds", "flashvlm:fast_diversity"]
        methods[methods.index("flashvlm") + 1 : methods.index("flashvlm") + 1] = extra
    return methods


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-selection",
        help="time each method's selection alone at growing N, and saliency in the vision tower",
        description="Time each method's selection alone at N tokens (K = N/9), fit how it grows with N, and "
        "compare the vision tower with flashvlm's saliency extraction against full attention maps.",
    )
    parser.add_argument(
        "--model",
        default="llava-1.5-7b",
        help=f"config whose widths the selection inputs take and whose tower is compared ({', '.join(SHIPPED_CONFIGS)}, "
        "or a config.json / model folder)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods (NAME or NAME:PRESET; a trailing @rounds runs a method whose diversity is 'bipartite', "
        "such as flashvlm, with that step round by round, as released); default: all, plus flashvlm's release, "
        "fast_diversity and @rounds variants",
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        type=int,
        default=list(DEFAULT_TOKEN_COUNTS),
        help="N values (default 576 2880 10000 50000)",
    )
    parser.add_argument("--text-tokens", type=int, default=40, help="prompt text tokens (default 40)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="a method whose one call takes longer is not run at larger N (extrapolated instead; default 20)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-tower", action="store_true", help="skip the vision-tower comparison")
    parser.add_argument("--tower-batch", type=int, default=1, help="images per tower call (default 1)")
    add_common_bench_arguments(parser, default_repeats=3)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    methods = args.methods or default_methods()
    for method in methods:
        bench_method(method)
    for count in args.tokens:
        check_count("--tokens", count, 9)
    apply_common_settings(args)
    check_count("--text-tokens", args.text_tokens, 1)
    check_count("--tower-batch", args.tower_batch, 1)
    if not args.max_seconds > 0:
        raise FlashVLMError(f"--max-seconds must be > 0; got {args.max_seconds}")
    scale = parse_scale(args.scale)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    real_config = load_config(args.model)
    feature_width = family_of(real_config).feature_width(real_config)

    def progress(message: str) -> None:
        print(f"  measuring {message}", file=sys.stderr, flush=True)

    # Selection runs at the real widths: it is cheap enough everywhere, and its share of the
    # prefill is what the goals are about.
    rows, fits, skipped = selection_scaling(
        methods,
        sorted(args.tokens),
        real_config.text_config,
        feature_width,
        text_tokens=args.text_tokens,
        device=device,
        dtype=dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        measure_memory=not args.no_memory,
        progress=progress,
    )
    report = {
        "command": "flashvlm bench-selection " + shlex.join(_argv(args, methods)),
        "machine": machine_description(device),
        "model": {
            "name": args.model,
            "dtype": str(dtype).removeprefix("torch."),
            "vision_width": feature_width,
            "lm_width": real_config.text_config.hidden_size,
            "text_tokens": args.text_tokens,
        },
        "lm_prefill_estimate": "analytic FLOPs of the full-size LM prefill of text + K tokens / the measured rate "
        "of an LM-shaped matmul on this device: a lower bound on the real prefill time",
        "rows": rows,
        "fits": fits,
        "skipped": skipped,
        "tower": None,
    }
    if not args.no_tower:
        progress("vision tower")
        try:
            tower = tower_saliency_overhead(
                real_config,
                scale,
                batch=args.tower_batch,
                device=device,
                dtype=dtype,
                repeats=args.repeats,
                warmup=args.warmup,
                measure_memory=not args.no_memory,
            )
            tower["shape"] = describe_shape(scale_config(real_config, scale), scale, real_config).split("; ")[-1]
            report["tower"] = tower
        except UnsupportedModelError as error:
            skipped.append(f"vision tower comparison: {error}")
    header = [
        f"selection inputs at {args.model} widths (vision {feature_width}, "
        f"LM {real_config.text_config.hidden_size}), {args.text_tokens} text tokens, K = N // 9, "
        f"{report['model']['dtype']}, median of {args.repeats} runs",
        f"measured on {machine_line(report['machine'])}",
        "LM prefill of kept = " + report["lm_prefill_estimate"],
    ]
    print("\n".join(header))
    print(selection_table(report))
    if report["tower"]:
        print(f"\nvision tower of {args.model}, {report['tower']['shape']}")
        print(tower_table(report["tower"]))
    for message in skipped:
        print(f"skipped: {message}")
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        parts = [
            f"## Selection overhead: {args.model} widths, {device.type.upper()}",
            f"```bash\n{report['command']}\n```",
            "\n".join(f"- {line}" for line in header),
            selection_table(report, markdown=True),
        ]
        if report["tower"]:
            parts += [
                f"### Vision tower: saliency vs attention maps ({report['tower']['shape']})",
                tower_table(report["tower"], markdown=True),
            ]
        parts.append("\n".join(f"- skipped: {message}" for message in skipped))
        update_markdown_section(
            args.markdown, f"selection-{args.model}-{device.type}", "\n\n".join(parts), PERFORMANCE_PREAMBLE
        )
    return 0


def _argv(args: argparse.Namespace, methods: list[str]) -> list[str]:
    words = ["--model", args.model, "--methods", *methods, "--tokens", *map(str, args.tokens)]
    for flag, value in (
        ("--device", args.device),
        ("--dtype", args.dtype),
        ("--repeats", args.repeats),
        ("--warmup", args.warmup),
        ("--max-seconds", args.max_seconds),
        ("--tower-batch", args.tower_batch),
        ("--threads", args.threads),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.scale:
        words += ["--scale", *args.scale]
    if args.no_memory:
        words.append("--no-memory")
    if args.no_tower:
        words.append("--no-tower")
    return words
