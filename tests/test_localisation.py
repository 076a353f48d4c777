"""Localisation of heatmaps against evidence masks: the metrics against Quantus and scikit-learn, the two
baselines where their answer is known, and masks that follow the images' geometry but never training."""

import numpy as np
import pytest
import quantus
import torch
from sklearn.metrics import jaccard_score

from fedmed.explain.localisation import baseline_maps, localisation, localisation_table


def _case(n=12, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size, size, generator=g) ** 3  # continuous: no ties at the top
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r0, c0 = torch.randint(0, size - 6, (2,), generator=g).tolist()
        h, w = torch.randint(3, 7, (2,), generator=g).tolist()
        masks[i, r0:r0 + h, c0:c0 + w] = True
    maps[0][masks[0]] += 2  # one map whose maximum is surely inside
    return maps, masks


def test_pointing_game_relevance_mass_and_rank_equal_quantus_and_iou_scikit_learn():
    maps, masks = _case()
    ours = localisation(maps, masks, top=0.2)
    a, s = maps[:, None].double().numpy(), masks[:, None].numpy().astype(float)
    x, y = np.zeros_like(a), np.zeros(len(a), dtype=int)
    kw = {"disable_warnings": True, "normalise": False}
    expected = {
        "pointing_game": quantus.PointingGame(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s),
        "relevance_mass": quantus.RelevanceMassAccuracy(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s),
        "relevance_rank": quantus.RelevanceRankAccuracy(**kw)(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(ours[name].numpy(), np.asarray(want, dtype=float), atol=1e-12, err_msg=name)
    k = round(0.2 * 400)
    for i in range(len(maps)):
        top = np.zeros(400, dtype=bool)
        top[np.argsort(-maps[i].flatten().numpy(), kind="stable")[:k]] = True
        assert float(ours["top_iou"][i]) == pytest.approx(jaccard_score(masks[i].flatten().numpy(), top), abs=1e-12)
    assert ours["pointing_game"][0] == 1


def test_baselines_score_what_they_should():
    n, size = 200, 32
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 10:22, 10:22] = True  # centred lesions, 14% of the image
    table = localisation_table({}, masks, seed=1)
    rnd, centre = table["baseline: random"], table["baseline: centre"]
    assert rnd["relevance_mass"] == pytest.approx(144 / 1024, abs=0.01)  # noise puts mass in proportion to area
    assert rnd["relevance_rank"] == pytest.approx(144 / 1024, abs=0.02)
    assert centre["pointing_game"] == 1  # the centre of a centred lesion
    assert centre["relevance_rank"] > 0.85 > 5 * rnd["relevance_rank"]  # a disc of top pixels in a square lesion
    off = torch.roll(masks, shifts=(12, 12), dims=(1, 2))  # lesions in a corner: the centre prior fails
    assert localisation_table({}, off)["baseline: centre"]["pointing_game"] == 0
    assert baseline_maps("centre", (1, 9, 9))[0].argmax() == 40  # the middle pixel


def test_empty_masks_give_nan_and_shapes_must_match():
    maps, masks = _case(n=3)
    masks[1] = False
    out = localisation(maps, masks)
    assert all(torch.isnan(v[1]) and not torch.isnan(v[0]) for v in out.values())
    with pytest.raises(ValueError, match="differ"):
        localisation(maps[:, :5], masks)
