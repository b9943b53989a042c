"""How often our defaults keep other tokens than the authors' releases, at LLaVA-1.5 shapes.

    .venv/bin/python lab/release_agreement.py [--seeds 3] [--kinds clustered,gaussian] [--out FILE.json]

For each feature kind (``clustered``: tokens of a 24 x 24 grid drawn around the centre of
their image region, fp16-rounded as a half-precision tower emits them; ``letterboxed``:
the same with the top and bottom 3 rows one repeated token, as uniform padding of a 4:3
image can give; ``gaussian``: i.i.d. normal features), seed (``--seeds``, 2 images each)
and budget (192, 128, 64, 32),
it builds one image's selection inputs at LLaVA-1.5 shapes (N = 576 tokens, C = 1024
vision width, D = 4096 after a random two-layer GELU projector, 40 text tokens, a
peaked CLS attention row) and compares the kept sets of each pair below: exact match
(share of images whose kept sets are identical) and the mean Jaccard index of the kept
sets. The releases are the restatements the parity tests check (tests/releases.py), and
each ``release`` preset is compared with them too (it must be 100 %). Writes a Markdown
table to stdout and, with ``--out``, the figures as JSON. Random tensors, no weights:
about 10 minutes per feature kind on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from releases import released_divprune, released_flashvlm_llava, released_vispruner  # noqa: E402

from flashvlm.selection import SelectionInputs, get_method  # noqa: E402

NUM_TOKENS, VISION_WIDTH, LM_WIDTH, TEXT_TOKENS, GRID = 576, 1024, 4096, 40, 24
BUDGETS = (192, 128, 64, 32)
IMAGES_PER_SEED = 2


def clustered_features(generator: torch.Generator) -> torch.Tensor:
    """(N, C): each token near the centre of its image region (a Voronoi cell of 12 random
    seeds on the grid), with a shared component, rounded to fp16 like a half-precision tower's."""
    seeds = torch.rand(12, 2, generator=generator) * GRID
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()  # (N, 2)
    region = torch.cdist(cells, seeds).argmin(dim=1)  # (N,)
    shared = torch.randn(VISION_WIDTH, generator=generator)
    centres = torch.randn(12, VISION_WIDTH, generator=generator)
    noise = torch.randn(NUM_TOKENS, VISION_WIDTH, generator=generator)
    features = shared + centres[region] + 0.5 * noise
    return features.half().float()


def letterboxed_features(generator: torch.Generator) -> torch.Tensor:
    """(N, C): clustered, with the top and bottom 3 rows (a 4:3 image padded to a square, as
    LLaVA-1.5 pads) one repeated token: the extreme case of uniform padding, exact duplicates."""
    features = clustered_features(generator)
    padding = torch.zeros(GRID, GRID, dtype=torch.bool)
    padding[:3], padding[-3:] = True, True
    features[padding.flatten()] = features[0].clone()
    return features


FEATURE_KINDS = {"clustered": clustered_features, "letterboxed": letterboxed_features}


def image_inputs(kind: str, generator: torch.Generator, projector: torch.nn.Module, dtype: torch.dtype):
    """One image's SelectionInputs at LLaVA-1.5 shapes, and its text (L, D) for the release."""
    if kind in FEATURE_KINDS:
        features = FEATURE_KINDS[kind](generator)
    else:
        features = torch.randn(NUM_TOKENS, VISION_WIDTH, generator=generator)
    # A CLS row peaked on a few tokens, post-softmax, as CLIP's layer -2 gives.
    cls_attention = torch.softmax(3 * torch.randn(NUM_TOKENS + 1, generator=generator), dim=-1)[1:]
    text = torch.randn(TEXT_TOKENS, LM_WIDTH, generator=generator) * 0.02
    with torch.no_grad():
        projected = projector(features)
    return features.to(dtype), cls_attention, projected.to(dtype), text.to(dtype)


def stacked_inputs(images: list[tuple]) -> SelectionInputs:
    features, saliency, projected, text = (torch.stack(part) for part in zip(*images))
    return SelectionInputs(
        features=features,
        saliency=saliency,  # float32, as the adapters hand it over
        saliency_kind="cls",
        projected=projected,
        text_embeds=text,
        text_mask=torch.ones(text.shape[:2], dtype=torch.bool),
    )


def released(reference: str, inputs: SelectionInputs, text: list[torch.Tensor], budget: int) -> torch.Tensor:
    """The restated release's kept indices (B, K); its attention map is in the model's dtype."""
    saliency = inputs.saliency.to(inputs.features.dtype)
    if reference == "flashvlm":
        return released_flashvlm_llava(inputs.features, saliency, inputs.projected, text, budget)
    if reference == "vispruner":
        return released_vispruner(inputs.features, saliency, budget)
    return torch.tensor([released_divprune(projected, budget) for projected in inputs.projected])


def agreement(kept: torch.Tensor, other: torch.Tensor) -> tuple[bool, float]:
    mine, theirs = set(kept.tolist()), set(other.tolist())
    return mine == theirs, len(mine & theirs) / len(mine | theirs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--kinds", default="clustered,gaussian", help="comma-separated: clustered, letterboxed, gaussian"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    # (name, dtype, our selector, the reference it is compared with)
    comparisons = [
        ("flashvlm default vs release", torch.float32, "flashvlm", "flashvlm"),
        (
            "flashvlm stable_ranking=False vs release",
            torch.float32,
            ("flashvlm", (("stable_ranking", False),)),
            "flashvlm",
        ),
        ("flashvlm:release vs release", torch.float32, "flashvlm:release", "flashvlm"),
        ("flashvlm default vs release (fp16)", torch.float16, "flashvlm", "flashvlm"),
        ("flashvlm:release vs release (fp16)", torch.float16, "flashvlm:release", "flashvlm"),
        ("vispruner default vs release", torch.float32, "vispruner", "vispruner"),
        ("vispruner default vs release (fp16)", torch.float16, "vispruner", "vispruner"),
        ("vispruner:release vs release (fp16)", torch.float16, "vispruner:release", "vispruner"),
        ("divprune default vs release (fp16)", torch.float16, "divprune", "divprune"),
        ("divprune:release vs release (fp16)", torch.float16, "divprune:release", "divprune"),
    ]
    results: dict[str, dict[str, dict[int, list]]] = {}
    for kind in args.kinds.split(","):
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            projector = torch.nn.Sequential(
                torch.nn.Linear(VISION_WIDTH, LM_WIDTH), torch.nn.GELU(), torch.nn.Linear(LM_WIDTH, LM_WIDTH)
            )
            images = {dtype: [] for dtype in (torch.float32, torch.float16)}
            for _ in range(IMAGES_PER_SEED):
                state = generator.get_state()
                for dtype in images:
                    generator.set_state(state)  # the same image in both dtypes
                    images[dtype].append(image_inputs(kind, generator, projector, dtype))
            inputs = {dtype: stacked_inputs(images[dtype]) for dtype in images}
            kept, expected = {}, {}  # each selection once, however many comparisons use it
            for name, dtype, ours, reference in comparisons:
                if (ours, dtype) not in kept:
                    selector = get_method(ours) if isinstance(ours, str) else get_method(ours[0], **dict(ours[1]))
                    kept[ours, dtype] = {budget: selector(inputs[dtype], budget).indices for budget in BUDGETS}
                if (reference, dtype) not in expected:
                    expected[reference, dtype] = {
                        budget: released(reference, inputs[dtype], [text for *_, text in images[dtype]], budget)
                        for budget in BUDGETS
                    }
                for budget in BUDGETS:
                    rows = results.setdefault(name, {}).setdefault(kind, {}).setdefault(budget, [])
                    rows += [
                        agreement(kept[ours, dtype][budget][b], expected[reference, dtype][budget][b])
                        for b in range(IMAGES_PER_SEED)
                    ]
            print(f"{kind} seed {seed} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)

    table = ["| comparison | features | " + " | ".join(f"K={k}" for k in BUDGETS) + " |"]
    table.append("|---|---|" + "---|" * len(BUDGETS))
    figures = {}
    for name, per_kind in results.items():
        for kind, per_budget in per_kind.items():
            cells = []
            for budget in BUDGETS:
                rows = per_budget[budget]
                exact = 100 * sum(same for same, _ in rows) / len(rows)
                jaccard = sum(j for _, j in rows) / len(rows)
                figures.setdefault(name, {}).setdefault(kind, {})[budget] = {
                    "exact_match_percent": exact,
                    "mean_jaccard": jaccard,
                    "images": len(rows),
                }
                cells.append(f"{exact:.0f} % / {jaccard:.3f}")
            table.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    print("exact match / mean Jaccard over", args.seeds * IMAGES_PER_SEED, "images per cell")
    print("\n".join(table))
    print(f"({time.perf_counter() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if args.out:
        args.out.write_text(json.dumps({"seeds": args.seeds, "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
