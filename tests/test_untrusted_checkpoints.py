"""A checkpoint comes from elsewhere (a colleague, a shared tracking server): it never chooses code.

``fedmed explain``, ``fedmed audit privacy`` and ``fedmed fit resume=`` read a checkpoint's config;
a ``_target_`` in it that is not fedmed's own class for that key (``builtins.open``, ``torch.load``
of a pickle) is refused in one line naming the key, before anything is imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedmed.config import compose
from fedmed.errors import FedmedError


class _Plant:
    """A pickle that, if ever unpickled, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _config(isolated: list[str], net: dict) -> dict:
    cfg = OmegaConf.to_container(compose("fit", [*isolated, "experiment=smoke"]), resolve=True)
    assert isinstance(cfg, dict)
    cfg["model"]["net"] = net
    return cfg


def _attacks(tmp_path: Path) -> tuple[Path, Path, list[tuple[dict, str]]]:
    """(a file the attack would empty, a file the pickle would create, [(model.net, what the refusal names)])."""
    victim, marker = tmp_path / "victim.txt", tmp_path / "planted"
    victim.write_text("patient list")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Plant(marker)))
    return victim, marker, [
        ({"_target_": "builtins.open", "file": str(victim), "mode": "w"}, "model.net._target_='builtins.open'"),
        ({"_target_": "torch.load", "f": str(evil), "weights_only": False}, "model.net._target_='torch.load'"),
        ({"_target_": "fedmed.models.CompactCNN", "in_channels": 1, "num_classes": 2,
          "extra": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}}, "model.net.extra._target_"),
        ({"_target_": "fedmed.models.CompactCNN", "in_channels": "${oc.env:HOME}"}, "an interpolation"),
    ]


def _untouched(victim: Path, marker: Path) -> None:
    assert victim.read_text() == "patient list" and not marker.exists()


@pytest.mark.parametrize("verb", ["explain", "audit privacy"])
def test_explain_and_audit_refuse_a_checkpoint_that_names_code(verb, isolated, tmp_path, capsys):
    from fedmed.cli import main

    victim, marker, attacks = _attacks(tmp_path)
    for net, named in attacks:
        path = tmp_path / "model.pt"
        torch.save({"state_dict": {}, "config": _config(isolated, net), "class_names": ["a", "b"]}, path)
        rc = main([*verb.split(), *isolated, f"checkpoint={path}"])
        err = capsys.readouterr().err
        assert rc != 0 and named in err, err
        assert len([line for line in err.strip().splitlines() if "error" in line]) == 1, err
        _untouched(victim, marker)


def test_a_server_checkpoint_that_names_code_is_refused_on_resume(isolated, tmp_path):
    from fedmed.tasks import fit

    victim, marker, attacks = _attacks(tmp_path)
    for net, named in attacks:
        folder = tmp_path / "run"
        folder.mkdir(exist_ok=True)
        torch.save({"round": 1, "run_id": "r", "config": _config(isolated, net)}, folder / "server.pt")
        with pytest.raises(FedmedError, match="resume=") as info:
            fit.run(compose("fit", [*isolated, "experiment=smoke", f"resume={folder}"]))
        assert named in str(info.value)
        _untouched(victim, marker)


def test_a_logged_model_is_rebuilt_only_from_fedmed_networks(tmp_path):
    from fedmed.model_export import ImageClassifier

    victim, marker, attacks = _attacks(tmp_path)
    for net, _ in attacks[:3]:
        with pytest.raises(FedmedError, match="model.net"):
            ImageClassifier(net, {}, ["a", "b"]).load({})
        _untouched(victim, marker)
    good = {"_target_": "fedmed.models.CompactCNN", "in_channels": 1, "num_classes": 2}
    from fedmed.models import CompactCNN

    state = CompactCNN(in_channels=1, num_classes=2).state_dict()
    assert ImageClassifier(good, {}, ["a", "b"]).load(state).net is not None
