"""How every figure of the repository is drawn and stored: matplotlib with the Agg backend, saved
as a PNG of at most 256 colours.

The figures live in git, and a device call carries the whole working tree within 64 MiB
(`stepjax.campaign.slot.tree_bytes`): a 256-colour PNG of a plot is about a third of matplotlib's
RGBA one and looks the same (plots use few colours; a colour map is 256 entries).
``python -m stepjax.figures DIR`` rewrites the PNGs already under `DIR` the same way.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

COLOURS = 256


def pyplot():
    """`matplotlib.pyplot`, with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int) -> None:
    """Write `fig` to `path` (its folder made) as a 256-colour PNG at `dpi` and close it.

    **Arguments:**

    - `fig`: a matplotlib figure.
    - `path`: the PNG file to write.
    - `dpi`: dots per inch.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(palette_png(buffer.getvalue()))


def palette_png(data: bytes) -> bytes:
    """The PNG `data` as a PNG of at most 256 colours (maximum coverage, no dithering: flat areas stay flat;
    an image of at most 256 colours keeps them exactly)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    palette = image.quantize(colors=COLOURS, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="png", optimize=True)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.figures", description=(
        "Rewrite every PNG under the given folders as a PNG of at most 256 colours, where that is smaller."))
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"stepjax.figures: no folder {', '.join(missing)}: name folders that hold PNGs.")
    before = after = 0
    for path in sorted(p for d in args.dirs for p in d.rglob("*.png")):
        data = path.read_bytes()
        small = palette_png(data)
        if len(small) < len(data):
            path.write_bytes(small)
        before, after = before + len(data), after + min(len(small), len(data))
    print(f"PNGs: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
