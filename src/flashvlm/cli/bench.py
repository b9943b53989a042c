"""``flashvlm bench``: prefill, time to first token, decode, memory and FLOPs, per method x budget."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..bench.models import (
    SCALE_PRESETS,
    SHIPPED_CONFIGS,
    describe_shape,
    load_model_for_bench,
    parse_scale,
    synthetic_inputs,
)
from ..bench.prefill import UNSTEADY_SPREAD, run_prefill_benchmark
from ..bench.tables import (
    PERFORMANCE_PREAMBLE,
    machine_description,
    prefill_header,
    prefill_table,
    write_json,
)
from ..errors import FlashVLMError
from ..files import update_markdown_section
from ..loading import resolve_device, resolve_dtype
from ..selection import available_methods, get_method
from .common import budget_key, check_count, check_output_file, parse_budgets, without_repeats


def attention_implementations() -> list[str]:
    """What ``--attn`` accepts: eager and every attention function transformers registers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # flashvlm's own entries serve one layer of one method (fastv), not a whole model.
    names = [
        name for name in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in name and not name.startswith("flashvlm")
    ]
    return ["eager", *names]


def check_attention(name: str) -> None:
    accepted = attention_implementations()
    # "org/kernel" names a hub kernel, which transformers fetches itself; "paged|sdpa" wraps one above.
    if name.removeprefix("paged|") not in accepted and "/" not in name:
        raise FlashVLMError(f"--attn must be one of {', '.join(accepted)}; got {name!r}")


def add_common_bench_arguments(parser: argparse.ArgumentParser, default_repeats: int, default_warmup: int = 1) -> None:
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    parser.add_argument(
        "--repeats", type=int, default=default_repeats, help=f"timed runs per case (default {default_repeats})"
    )
    parser.add_argument(
        "--warmup", type=int, default=default_warmup, help=f"untimed runs before them (default {default_warmup})"
    )
    parser.add_argument(
        "--scale",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"shrink the model for a CPU: a preset ({', '.join(SCALE_PRESETS)}) or lm_layers=N vision_layers=N "
        "width=F (fraction of hidden sizes); token counts are never scaled (default: full size)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", metavar="OUT", help="write every figure as JSON")
    parser.add_argument(
        "--markdown", metavar="OUT", help="write (or replace) this benchmark's section of a Markdown file"
    )


def apply_common_settings(args: argparse.Namespace) -> None:
    """Validate the shared options (output files included, before anything is built) and apply --threads."""
    check_count("--repeats", args.repeats, 1)
    check_count("--warmup", args.warmup, 0)
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            check_output_file(option, path)
    if args.threads is not None:
        check_count("--threads", args.threads, 1)
        torch.set_num_threads(args.threads)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill, TTFT, decode, memory and FLOPs per method and budget",
        description="Measure vision, selection, prefill, time to first token, decode speed, peak memory, KV-cache "
        "bytes and analytic FLOPs of a VLM per method x budget, against the unpruned model and the ideal speed-up.",
    )
    parser.add_argument(
        "--model",
        default="llava-1.5-7b",
        help=f"a shipped config ({', '.join(SHIPPED_CONFIGS)}), a config.json, or a model folder "
        "(its weights are loaded when present and no --scale is given; otherwise random weights)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="methods (NAME or NAME:PRESET); default: every registered method"
    )
    parser.add_argument(
        "--budgets", nargs="+", default=["64", "128", "192"], help="visual tokens kept per image (default 64 128 192)"
    )
    # Two warm-up runs: the first after loading still grows the allocator and picks kernels,
    # and on a loaded CPU its successor is often slow too, which skews the baseline.
    add_common_bench_arguments(parser, default_repeats=5, default_warmup=2)
    parser.add_argument("--batch-size", type=int, default=1, help="rows, one image each (default 1)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row (default 16)")
    parser.add_argument(
        "--text-tokens", type=int, default=40, help="text tokens of the prompt besides the image (default 40)"
    )
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the model (default sdpa)")
    parser.add_argument(
        "--cpu-memory", action="store_true", help="on CPU, one extra run per case to track peak tensor memory"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before anything is built.
    budgets = parse_budgets("bench", args.budgets)
    written = {budget_key(budget): text for text, budget in budgets.items()}  # the table shows "25%", not 0.25
    methods = args.methods or available_methods()
    methods = without_repeats("bench", methods, methods, "method")
    for method in methods:
        if getattr(get_method(method), "text_tokens", "prompt") == "question":
            # The synthetic prompts have no user's words apart from the template to guide it.
            raise FlashVLMError(
                f"--methods: {method!r} is guided by the user's question alone, which the bench's synthetic "
                "prompts do not have; time it as 'flashvlm' (the same selection, guided by the whole prompt)"
            )
    apply_common_settings(args)
    check_count("--batch-size", args.batch_size, 1)
    check_count("--new-tokens", args.new_tokens, 1)
    check_count("--text-tokens", args.text_tokens, 8)
    check_attention(args.attn)
    scale = parse_scale(args.scale)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, config, real_config, weights = load_model_for_bench(args.model, scale, device, dtype, args.attn)
    inputs = synthetic_inputs(config, args.batch_size, args.text_tokens).to(device)

    def progress(message: str) -> None:
        print(f"  measuring {message}", file=sys.stderr, flush=True)

    rows, skipped = run_prefill_benchmark(
        model,
        config,
        inputs,
        methods,
        list(budgets.values()),
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        device=device,
        dtype=dtype,
        measure_cpu_memory=args.cpu_memory,
        progress=progress,
    )
    for row in rows:
        if row["budget"] is not None:
            row["budget"] = written[budget_key(row["budget"])]
    report = {
        "command": "flashvlm bench " + shlex.join(_argv(args)),
        "machine": machine_description(device),
        "model": {
            "name": args.model,
            "architecture": config.architectures[0],
            "weights": weights,
            "scale": scale,
            "shape": describe_shape(config, scale, real_config),
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": args.attn,
            "batch_size": args.batch_size,
            "visual_tokens": inputs.visual_tokens_per_image,
            "visual_layout": inputs.layout,
            "text_tokens": inputs.text_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "rows": rows,
        "skipped": skipped,
    }
    print("\n".join(prefill_header(report)))
    print(prefill_table(report))
    for message in skipped:
        print(f"skipped: {message}")
    unsteady = [f"{row['method']} @ {row['budget']}" for row in rows if row.get("speedup_unsteady")]
    unsteady_note = (
        f"measured/ideal marked (unsteady): the interquartile range of its prefill repeats, or of the unpruned "
        f"baseline's, exceeds {UNSTEADY_SPREAD:.0%} of their median"
    )
    if unsteady:
        print(
            f"flashvlm bench: warning: {unsteady_note} ({', '.join(unsteady)}): the machine was busy; "
            "rerun with more --repeats / --warmup, or --threads 1 on a shared CPU",
            file=sys.stderr,
        )
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        body = "\n\n".join(
            [
                f"## Prefill: {args.model}"
                + (f" (SCALED: {' '.join(args.scale)})" if scale else "")
                + (f", batch {args.batch_size}" if args.batch_size > 1 else ""),
                f"```bash\n{report['command']}\n```",
                "\n".join(f"- {line}" for line in prefill_header(report)),
                prefill_table(report, markdown=True),
                "\n".join(f"- skipped: {message}" for message in skipped),
                f"- {unsteady_note}" if unsteady else "",
            ]
        )
        scale_tag = "-".join(args.scale) if args.scale else "full"
        # A batch is its own section: a batch-16 run must not replace the batch-1 table.
        batch_tag = f"-batch{args.batch_size}" if args.batch_size > 1 else ""
        update_markdown_section(
            args.markdown, f"prefill-{args.model}-{scale_tag}{batch_tag}", body, PERFORMANCE_PREAMBLE
        )
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of this run, spelled as on the command line (for the report)."""
    words = ["--model", args.model, "--methods", *(args.methods or available_methods()), "--budgets", *args.budgets]
    for flag, value in (
        ("--device", args.device),
        ("--dtype", args.dtype),
        ("--repeats", args.repeats),
        ("--warmup", args.warmup),
        ("--batch-size", args.batch_size),
        ("--new-tokens", args.new_tokens),
        ("--text-tokens", args.text_tokens),
        ("--threads", args.threads),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.scale:
        words += ["--scale", *args.scale]
    return words
