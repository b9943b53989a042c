"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from ..selection import available_methods


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face hub id or local model folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default="flashvlm",
        help=f"selection method, optionally with a preset as NAME:PRESET; one of {', '.join(available_methods())}",
    )
