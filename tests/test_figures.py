"""Every figure is stored as a PNG of at most 256 colours (`stepjax.figures`)."""

import io

import numpy as np
import pytest
from PIL import Image

from stepjax import figures


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="png")
    return out.getvalue()


def test_a_saved_figure_is_a_palette_png_close_to_matplotlibs(tmp_path):
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.imshow(np.linspace(0, 1, 400).reshape(20, 20))  # a continuous colour map: more than 256 shades drawn
    ax.plot([0, 19], [0, 19], color="tab:red")
    reference = io.BytesIO()
    fig.savefig(reference, format="png", dpi=80)
    figures.save(fig, tmp_path / "sub" / "f.png", dpi=80)
    saved = Image.open(tmp_path / "sub" / "f.png")
    assert saved.mode == "P"
    original = np.asarray(Image.open(reference).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(saved.convert("RGB"), dtype=int) - original).max() <= 8  # a shade off at most
    assert (tmp_path / "sub" / "f.png").stat().st_size < len(reference.getvalue())


def test_an_image_of_few_colours_keeps_them_exactly():
    rng = np.random.default_rng(0)
    colours = np.array([[255, 255, 255], [31, 119, 180], [214, 39, 40], [0, 0, 0], [128, 128, 128]], np.uint8)
    pixels = colours[rng.integers(0, len(colours), (40, 60))]
    kept = Image.open(io.BytesIO(figures.palette_png(png_bytes(Image.fromarray(pixels)))))
    np.testing.assert_array_equal(np.asarray(kept.convert("RGB")), pixels)


def test_the_command_rewrites_larger_pngs_and_names_a_missing_folder(tmp_path, capsys):
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8))  # RGBA noise: smaller as a palette
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "n.png").write_bytes(png_bytes(noisy))
    before = (tmp_path / "a" / "n.png").stat().st_size
    assert figures.main([str(tmp_path)]) == 0
    assert Image.open(tmp_path / "a" / "n.png").mode == "P" and (tmp_path / "a" / "n.png").stat().st_size < before
    assert "MiB ->" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no folder .*missing: name folders that hold PNGs"):
        figures.main([str(tmp_path / "missing")])
