"""Held-out retrieval of a recipe's runs on one pair set, per seed, from ``benchmarks/quickstart_recipes.py``'s runs.

The recipe study reports Tux Paint and emoji retrieval separately; this evaluates the trained runs of one
variant (seeds 0..N-1, ``OUT_DIR/NAME`` and ``OUT_DIR/NAME-sS``) on another pair set, by default both test
splits together (200 pairs), as the quickstart's ``retrieval tuxpaint:test,emoji:test`` row does.

    python benchmarks/recipe_retrieval.py --out-dir /tmp/rec2 --variant views4-grey0.5-unlock1
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lipkit.models import create_model
from lipkit.quickstart import QuickstartConfig, retrieval_result
from lipkit.train import checkpoint as ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="/tmp/lipkit_recipes", help="the recipe study's run folder")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", default="tuxpaint:test,emoji:test", help="pair set (a data spec)")
    args = parser.parse_args()
    cfg = QuickstartConfig(examples=0)
    rows = []
    for seed in range(args.seeds):
        name = args.variant + (f"-s{seed}" if seed else "")
        weights = ckpt.list_checkpoints(Path(args.out_dir) / name)[-1]
        model = create_model(ckpt.recorded_model_config(weights), pretrained=str(weights))
        values = retrieval_result(model, args.data, cfg, torch.device("cpu"))["values"]
        rows.append((values["image_to_text_R@1"], values["text_to_image_R@1"]))
        print(f"{name}: {values['n']} pairs, R@1 image->text / text->image {rows[-1][0]:.1f} / {rows[-1][1]:.1f}")
    i2t, t2i = [r[0] for r in rows], [r[1] for r in rows]
    print(
        f"mean {statistics.mean(i2t):.1f} / {statistics.mean(t2i):.1f}, "
        f"min {min(i2t):.1f} / {min(t2i):.1f}, max {max(i2t):.1f} / {max(t2i):.1f}"
    )


if __name__ == "__main__":
    main()
