"""Is asbound's procedural dSprites pixel-identical to the official file? A count that answers it.

The official ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` cannot be read here, but its mean
pixel value is published: ``0.042494423521889584``, hard-coded as the data set's mean in several
public code bases (three independent ones found). Over 737,280 binary 64x64 images that mean
is exactly 128,328,862 pixels that are on, 174.057 an image (no other count gives that float).
Identical images need the identical count; this script counts the procedural renderer's on pixels
over every image (or ``--n`` of them, drawn at random, with a standard error), in total and by
shape and scale.

    python analyses/dsprites_fidelity.py --out reports/dsprites-fidelity.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from asbound.data.dsprites import DSPRITES_SIZE, SHAPE_NAMES, dsprites_latents, render_dsprites
from asbound.records import environment

OFFICIAL_MEAN = 0.042494423521889584
PIXELS = DSPRITES_SIZE * 64 * 64
OFFICIAL_ON = round(OFFICIAL_MEAN * PIXELS)  # 128,328,862


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="images drawn at random (default: every image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("reports/dsprites-fidelity.txt"))
    args = parser.parse_args()
    assert OFFICIAL_ON / PIXELS == OFFICIAL_MEAN
    t0 = time.time()
    if args.n is None:
        index = torch.arange(DSPRITES_SIZE)
    else:
        index = torch.randperm(DSPRITES_SIZE, generator=torch.Generator().manual_seed(args.seed))[:args.n]
    counts = torch.empty(len(index), dtype=torch.int64)
    for i in range(0, len(index), args.chunk):
        img = render_dsprites(dsprites_latents(index[i:i + args.chunk])[0])
        counts[i:i + args.chunk] = img.flatten(1).sum(1).long()
    classes = dsprites_latents(index)[0]
    per_image = counts.double()
    mean_count = float(per_image.mean())
    se = float(per_image.std() / math.sqrt(len(per_image))) if args.n is not None else 0.0
    lines = [f"procedural dSprites, {'every image' if args.n is None else f'{args.n} random images'}: "
             f"{mean_count:.4f} on pixels an image (standard error {se:.3g}), mean pixel {mean_count / 4096:.12g}",
             f"official file (published mean {OFFICIAL_MEAN!r}): {OFFICIAL_ON / DSPRITES_SIZE:.4f} on pixels an image, "
             f"{OFFICIAL_ON:,} in all",
             f"ratio procedural / official: {mean_count / (OFFICIAL_ON / DSPRITES_SIZE):.4f}"]
    if args.n is None:
        lines.append(f"procedural total: {int(counts.sum()):,} on pixels ({int(counts.sum()) - OFFICIAL_ON:+,} "
                     f"against the official file)")
    by = {}
    for s, shape in enumerate(SHAPE_NAMES):
        for sc in range(6):
            k = (classes[:, 1] == s) & (classes[:, 2] == sc)
            by[f"{shape}/scale{sc}"] = float(per_image[k].mean())
    lines.append("mean on pixels by shape and scale index (0: 0.5 ... 5: 1.0): " + ", ".join(
        f"{k} {v:.1f}" for k, v in by.items()))
    lines.append(f"made by: python analyses/dsprites_fidelity.py" + (f" --n {args.n} --seed {args.seed}" if args.n else "")
                 + f" --out {args.out}  ({time.time() - t0:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"n": len(index), "mean_on_pixels": mean_count, "standard_error": se, "official_mean_pixel": OFFICIAL_MEAN,
         "official_on_pixels": OFFICIAL_ON, "by_shape_scale": by, **environment()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
