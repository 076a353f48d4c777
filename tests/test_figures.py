"""Figures a reviewer reads in MLflow: nothing cut, labelled, readable at the saved size, images at full resolution."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import same_color  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from fedmed.explain.figures import HEADERS, RELEVANCE_LABEL, WRONG_COLOUR, heatmap_grid  # noqa: E402
from fedmed.reporting import confusion_figure, partition_figure, wrap_to_width  # noqa: E402
from tests.conftest import DATA_DIR, PNEUMONIA, needs  # noqa: E402

BRAIN_JPG = DATA_DIR / "brain_tumor_mri" / "Testing" / "glioma"
LONG_TITLE = ("hospital_with_a_rather_long_name, round 12: integratedgradients of the global model on its own "
              "validation images (target: predicted class), which is a title far wider than the figure")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def texts(fig) -> list:
    """Every drawn, non-empty text of the figure (titles, labels, tick labels, legends, fig.text).

    Tick labels of ticks outside an axis's view limits exist as objects but are never drawn: left out.
    """
    undrawn = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    undrawn.update({id(tick.label1), id(tick.label2)})
    return [t for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in undrawn]


def draw(fig):
    """Draw the figure and return its renderer (a figure closed through pyplot gets an Agg canvas again)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def outside(fig) -> list[tuple[str, tuple[float, ...]]]:
    """Texts whose drawn extent leaves the figure (what a default ``savefig`` would cut)."""
    renderer = draw(fig)
    w, h = fig.bbox.width, fig.bbox.height
    bad = []
    for t in texts(fig):
        e = t.get_window_extent(renderer)
        if e.x0 < -0.5 or e.y0 < -0.5 or e.x1 > w + 0.5 or e.y1 > h + 0.5:
            bad.append((t.get_text(), e.bounds))
    return bad


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of texts drawn over each other (excluding tick labels of the colour bar with its own axes)."""
    renderer = draw(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts(fig)]
    return [(a, b) for i, (a, ea) in enumerate(boxes) for b, eb in boxes[i + 1 :] if ea.overlaps(eb)]


def saved_size(fig) -> tuple[int, int]:
    """Pixel size of the PNG that ``savefig`` writes with its defaults (as ``MlflowClient.log_figure`` does)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue())).size


def colourbars(fig) -> list:
    return [a for a in fig.axes if getattr(a, "_colorbar", None) is not None]


def image_axes(fig) -> list:
    return [a for a in fig.axes if a.images]


def all_text(fig) -> str:
    return "\n".join(t.get_text() for t in texts(fig))


def smallest_font(fig) -> float:
    return min(t.get_fontsize() for t in texts(fig))


def blobs(b: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.linspace(0.2, 0.8, b) * h, torch.linspace(0.8, 0.2, b) * w
    m = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * (0.15 * h) ** 2))
    return m / m.flatten(1).amax(1)[:, None, None]


NAMES = ["normal", "pneumonia"]


def grid(b: int = 5, c: int = 1, size: int = 28, **kw):
    x = torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0][:b])
    preds = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1][:b])
    probs = torch.linspace(0.6, 0.98, b)
    return heatmap_grid(x, blobs(b, size, size), labels, preds, probs, NAMES, "gradcam on test", **kw)


# -- the checks themselves can fail ---------------------------------------------------------------
def test_the_checks_catch_a_cut_text_and_an_overlap():
    fig = plt.figure(figsize=(3, 2), dpi=100)
    fig.text(0.9, 0.5, "a text that runs past the right edge")
    fig.text(0.1, 0.5, "x")
    fig.text(0.1, 0.5, "y")
    assert [t for t, _ in outside(fig)] == ["a text that runs past the right edge"]
    assert ("x", "y") in overlapping_texts(fig)
    fig, ax = plt.subplots(figsize=(3, 2), dpi=100)
    ax.set_title("a title much wider than this small figure, cut at both sides")
    assert outside(fig)


def test_wrap_to_width_keeps_every_line_within_the_width():
    lines = wrap_to_width(LONG_TITLE + " supercalifragilisticexpialidocious" * 3, 300, 12, 100, "bold")
    assert len(lines) > 3 and " ".join(lines).replace(" ", "") == (LONG_TITLE + " supercalifragilisticexpialidocious"
                                                                    * 3).replace(" ", "")
    from fedmed.reporting import text_width

    assert all(text_width(line, 12, 100, "bold") <= 300 for line in lines)


# -- heatmap grids --------------------------------------------------------------------------------
def test_heatmap_grid_has_colour_bar_headers_and_captions_naming_both_classes():
    fig = grid(5)
    bars = colourbars(fig)
    assert len(bars) == 1 and tuple(bars[0].get_xlim()) == (0.0, 1.0)
    text = all_text(fig)
    assert RELEVANCE_LABEL in text
    for h in HEADERS:
        assert sum(t.get_text() == h for t in texts(fig)) == 2  # two images side by side: headers over both
    assert "true: pneumonia \u00b7 pred: normal (p=0.60)" in text
    wrong = [t for t in texts(fig) if t.get_text().startswith("true: pneumonia \u00b7 pred: normal")]
    right = [t for t in texts(fig) if t.get_text().startswith("true: normal \u00b7 pred: normal")]
    assert same_color(wrong[0].get_color(), WRONG_COLOUR)
    assert same_color(right[0].get_color(), "black")
    assert len(image_axes(fig)) == 15
    assert outside(fig) == [] and overlapping_texts(fig) == []


def test_heatmap_grid_is_readable_at_its_saved_size():
    fig = grid(5)
    assert smallest_font(fig) >= 9
    w, h = saved_size(fig)
    assert (w, h) == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))
    draw(fig)
    for ax in image_axes(fig):
        box = ax.get_window_extent()
        assert box.width >= 2 * fig.dpi - 1 and box.height >= 2 * fig.dpi - 1  # >= 2 inches a tile
        assert box.width / 28 == pytest.approx(round(box.width / 28), abs=0.02)  # whole pixels per data pixel


@pytest.mark.parametrize("size", [128, 300])
def test_heatmap_grid_never_shrinks_an_image(size):
    fig = grid(2, size=size)
    draw(fig)
    for ax in image_axes(fig):
        box = ax.get_window_extent()
        assert box.width >= size - 0.5 and box.height >= size - 0.5
        assert box.width / size == pytest.approx(round(box.width / size), abs=0.02)
    assert outside(fig) == []


def test_heatmap_grid_rgb_non_square_and_coarse_maps():
    x = torch.rand(3, 3, 30, 40)
    maps = torch.rand(3, 7, 7)  # a coarse map is stretched over the image
    fig = heatmap_grid(x, maps, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]), torch.tensor([0.5, 0.6, 0.7]),
                       ["akiec", "bcc", "bkl"], "saliency on RGB")
    axes = image_axes(fig)
    assert len(axes) == 9 and axes[0].images[0].get_array().shape == (30, 40, 3)
    draw(fig)
    box = axes[0].get_window_extent()
    assert box.width / box.height == pytest.approx(40 / 30, rel=0.01)
    assert axes[1].images[0].get_extent() == axes[0].images[0].get_extent()
    assert outside(fig) == []


def test_heatmap_grid_volumes_show_the_middle_slice():
    x = torch.zeros(2, 1, 9, 12, 12)
    x[:, :, 4, 3:6, 3:6] = 1.0  # only the middle slice (index 4 of 9) has the bright square
    maps = torch.zeros(2, 9, 12, 12)
    maps[:, 4] = 0.5
    fig = heatmap_grid(x, maps, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.9, 0.8]), NAMES, "3D")
    image_ax, heat_ax = image_axes(fig)[:2]
    assert np.asarray(image_ax.images[0].get_array())[3:6, 3:6].min() == 1.0
    assert np.asarray(heat_ax.images[0].get_array()).min() == 0.5
    assert "middle slice (index 4 of 9)" in all_text(fig)
    assert outside(fig) == []


def test_heatmap_grid_wraps_long_titles_and_class_names():
    names = ["normal", "a class with a very long name indeed, as some MedMNIST sets have, really long"]
    fig = heatmap_grid(torch.rand(3, 1, 28, 28), torch.rand(3, 28, 28), torch.tensor([0, 1, 1]),
                       torch.tensor([1, 1, 0]), torch.tensor([0.5, 0.6, 0.7]), names, LONG_TITLE)
    assert outside(fig) == [] and overlapping_texts(fig) == []
    assert "\n" in fig.texts[0].get_text()
    assert "very long name" in all_text(fig)


def test_heatmap_grid_keeps_the_positional_signature_and_per_row():
    x = torch.rand(6, 1, 28, 28)
    args = (x, torch.rand(6, 28, 28), torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
            torch.ones(6), NAMES, "t")
    fig = heatmap_grid(*args, 3)
    assert sum(t.get_text() == "image" for t in texts(fig)) == 3
    assert outside(fig) == []
    one = heatmap_grid(*args, per_row=1)
    assert sum(t.get_text() == "image" for t in texts(one)) == 1
    assert one.get_figheight() > one.get_figwidth()


def test_heatmap_grid_of_no_images():
    fig = heatmap_grid(torch.zeros(0, 1, 28, 28), torch.zeros(0, 28, 28), torch.zeros(0), torch.zeros(0),
                       torch.zeros(0), NAMES, "nothing misclassified")
    assert "no images" in all_text(fig) and outside(fig) == []


@needs(PNEUMONIA)
def test_heatmap_grid_on_real_pneumoniamnist(tmp_path):
    z = np.load(PNEUMONIA)
    x = torch.from_numpy(z["test_images"][:6]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(z["test_labels"][:6, 0]).long()
    fig = heatmap_grid(x, blobs(6, 28, 28), y, 1 - y, torch.full((6,), 0.98), NAMES, "gradcam on pneumoniamnist test")
    assert outside(fig) == [] and overlapping_texts(fig) == []
    assert "pred: normal (p=0.98)" in all_text(fig) and "true: pneumonia" in all_text(fig)
    fig.savefig(tmp_path / "pneumonia.png")
    assert Image.open(tmp_path / "pneumonia.png").size == saved_size(fig)


@needs(BRAIN_JPG)
def test_heatmap_grid_on_a_real_brain_mri_at_128_px():
    path = sorted(BRAIN_JPG.glob("*.jpg"))[0]
    img = Image.open(path).convert("L").resize((128, 128), Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).float().div(255)[None, None]
    names = ["glioma", "meningioma", "notumor", "pituitary"]
    fig = heatmap_grid(x, blobs(1, 128, 128), torch.tensor([0]), torch.tensor([3]), torch.tensor([0.71]), names,
                       "gradcam on brain_mri test")
    draw(fig)
    assert all(a.get_window_extent().width >= 128 for a in image_axes(fig))
    assert "true: glioma \u00b7 pred: pituitary (p=0.71)" in all_text(fig)
    assert outside(fig) == []


# -- confusion matrix and partition ------------------------------------------------------------
@pytest.mark.parametrize("names", [NAMES, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                                   ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                    "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                    "melanocytic nevi", "vascular lesions"]])
def test_confusion_figure_is_complete_and_uncut(names):
    k = len(names)
    cm = torch.arange(k * k).reshape(k, k) + 10 * torch.eye(k, dtype=torch.long)
    fig = confusion_figure(cm, names, LONG_TITLE)
    assert outside(fig) == [] and overlapping_texts(fig) == []
    assert saved_size(fig) == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))
    ax = fig.axes[0]
    x_ticks = [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]
    y_ticks = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    for name, xt, yt in zip(names, x_ticks, y_ticks, strict=True):
        assert xt == name and yt.startswith(name)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    row0 = cm[0].double() / cm[0].sum()
    cells = {t.get_text() for t in ax.texts}
    assert f"{int(cm[0, 1])}\n{float(row0[1]):.1%}" in cells
    assert len(colourbars(fig)) == 1
    assert smallest_font(fig) >= 9
    assert fig.get_suptitle().replace("\n", " ") == LONG_TITLE


def test_confusion_figure_with_an_empty_row():
    fig = confusion_figure(torch.tensor([[0, 0], [3, 5]]), NAMES, "test")
    assert "0\n0.0%" in {t.get_text() for t in fig.axes[0].texts}
    assert outside(fig) == []


def test_partition_figure_names_sites_and_classes():
    counts = np.array([[857, 54], [100, 1800], [255, 1100]])
    sites = ["hospital_a", "hospital_b", "a_site_with_a_long_name_for_its_bar"]
    fig = partition_figure(counts, NAMES, sites, LONG_TITLE)
    assert outside(fig) == [] and overlapping_texts(fig) == []
    ax = fig.axes[0]
    assert [t.get_text().replace("\n", "") for t in ax.get_xticklabels()] == sites
    legend = ax.get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(NAMES)
    text = all_text(fig)
    assert "n=911" in text and "1800" in text
    assert smallest_font(fig) >= 9
    assert saved_size(fig) == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))


def test_partition_figure_with_many_classes():
    counts = np.random.default_rng(0).integers(0, 500, size=(4, 7))
    fig = partition_figure(counts, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                           ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"], "ham10000: natural")
    assert outside(fig) == [] and len(fig.axes[0].get_legend().get_texts()) == 7
