"""``python -m stepjax.models --summary``: parameter counts of the presets with each controller."""

from __future__ import annotations

import argparse

from flax import nnx

from stepjax.controllers import CONTROLLERS
from stepjax.models.resnet import PRESETS, count_params, make_model

# Published counts (millions) from the reference papers (see docs/PAPER notes in the README).
PUBLISHED = {
    ("resnet164", 100, "constant"): 1.73, ("resnet164", 100, "se"): 1.93, ("resnet164", 100, "cbam"): 1.93,
    ("resnet164", 100, "srm"): 1.76, ("resnet164", 100, "dia"): 1.95,
    ("resnet50", 1000, "constant"): 25.56, ("resnet50", 1000, "se"): 28.09,
}


def param_count(preset, num_classes, controller):
    """Parameters of a preset, counted on abstract shapes (nothing is initialised)."""
    return count_params(nnx.eval_shape(lambda: make_model(preset, num_classes=num_classes, controller=controller)))


def summary_rows(presets=("resnet164", "resnet50"), controllers=tuple(CONTROLLERS)):
    """Rows ``(preset, classes, controller, millions, published or None)``."""
    rows = []
    for preset in presets:
        num_classes = 1000 if PRESETS[preset].stem == "imagenet" else 100
        for controller in controllers:
            count = param_count(preset, num_classes, controller) / 1e6
            rows.append((preset, num_classes, controller, count, PUBLISHED.get((preset, num_classes, controller))))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--summary", action="store_true", help="print the parameter table")
    parser.add_argument("--presets", nargs="+", default=["resnet164", "resnet50"], choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    if not args.summary:
        parser.print_help()
        return
    print("| preset | classes | controller | params (M) | published (M) |")
    print("| --- | --- | --- | --- | --- |")
    for preset, classes, controller, count, published in summary_rows(args.presets):
        print(f"| {preset} | {classes} | {controller} | {count:.3f} | {published if published else ''} |")


if __name__ == "__main__":
    main()
