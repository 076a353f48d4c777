"""Every config in configs/ composes and instantiates; typos give clear errors."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedmed.build import build_module, build_strategy
from fedmed.cli import main
from fedmed.config import compose, config_dir, groups, site_config
from fedmed.errors import FedmedError
from fedmed.federated.messages import FitResult
from fedmed.schema import validate
from tests.conftest import REPO


def all_options():
    return [(g, o) for g, opts in groups("fit").items() for o in opts]


def test_groups_cover_the_config_folder():
    g = groups("fit")
    assert {"data", "model", "strategy", "partition", "federation", "trainer", "logger", "site", "experiment"} <= set(g)
    assert {"fedavg", "fedprox", "scaffold", "fednova", "krum"} <= set(g["strategy"])
    assert {"pneumoniamnist", "breastmnist"} <= set(g["data"]) and {"cnn", "densenet"} <= set(g["model"])


@pytest.mark.parametrize("group,option", all_options())
def test_every_config_composes_and_instantiates(group, option, isolated, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    needs_values = {"medmnist": ["data.name=bloodmnist"], "image_folder": [f"data.source.root={tmp_path}"],
                    "nifti": [f"data.source.root={tmp_path}", "data.num_classes=3"]}
    if group == "site":  # a site alone trains on its share of a federation that names it
        needs_values[option] = [f"federation.sites=[{','.join(sorted({'hospital_a', 'hospital_b', option}))}]"]
    cfg = compose("fit", [*isolated, f"{group}={option}", *needs_values.get(option, [])])
    assert isinstance(cfg, DictConfig)
    if option != "krum":  # (krum refuses the default 3 sites: tests/test_refusals.py)
        validate(cfg, "fit")  # every shipped option passes the schema
    src = instantiate(cfg.data.source)
    if option not in needs_values:  # (those point at empty folders)
        assert src.num_classes == cfg.data.num_classes, "data yaml num_classes disagrees with the source"
    module = build_module(cfg)
    x = torch.zeros(2, cfg.data.in_channels, *(cfg.data.image_size,) * cfg.data.spatial_dims)
    assert module(x).shape == (2, cfg.data.num_classes)
    state = module.net.state_dict()
    strategy = build_strategy(cfg, num_sites=5)  # both halves of a round, whatever the strategy (Krum: >= 5 sites)
    part = strategy.site_part()
    part.configure(strategy.configure_fit(state))
    part.callbacks()
    extras = part.after_training(state, state, 1, [1.0])
    fits = [FitResult(f"s{k}", state, 3, extras=extras) for k in range(5)]
    assert strategy.aggregate_fit(state, fits).keys() == state.keys()
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, **cfg.trainer)
    for s in cfg.federation.sites:
        site = site_config(cfg, s)
        assert site.name == s and site.manifest.endswith(f"{cfg.partition.dirname}/{s}.json")
    if group == "site":
        assert cfg.site.name == option


def test_overrides_reach_the_config(isolated):
    cfg = compose("fit", [*isolated, "federation.rounds=3", "partition=iid", "model=densenet", "seed=7",
                          "trainer.accelerator=cpu"])
    assert (cfg.federation.rounds, cfg.partition.method, cfg.model.name, cfg.seed) == (3, "iid", "densenet", 7)
    assert cfg.partition.dirname == "iid-k3-seed7"
    cfg = compose("fit", [*isolated, "partition.alpha=0.1", "experiment=smoke"])
    assert cfg.partition.dirname == "dirichlet-a0.1-k2-seed42"
    cfg = compose("fit", [*isolated, "experiment=brain_mri", "federation.rounds=2"])
    got = (cfg.data.name, cfg.data.image_size, cfg.federation.local_epochs, cfg.federation.rounds)
    assert got == ("brain_mri", 128, 1, 2)
    assert (cfg.model.logit_adjust, cfg.model.optimizer.schedule) == (1.0, "cosine")
    assert build_module(cfg).net.target_layers == ("features.block4.act",)  # 128 px: the 4-block CNN
    assert not build_module(cfg).keep_state  # the preset's README figures: a fresh optimizer every round


def test_default_fit_has_the_benchmarked_settings(isolated):
    """README Results: the PneumoniaMNIST figures are of these settings; other datasets keep theirs."""
    cfg = compose("fit", list(isolated))
    aug = cfg.data.transforms.augment
    assert (aug.rotate_degrees, aug.zoom, aug.affine_prob, aug.flip_prob) == (10, 0.1, 0.5, 0.0)
    assert (cfg.federation.rounds, cfg.federation.local_epochs, build_strategy(cfg).name) == (10, 2, "fedavg")
    assert build_module(cfg).keep_state
    assert compose("fit", [*isolated, "data=breastmnist"]).data.transforms.augment.affine_prob == 0.0


def test_key_typo_names_key_and_suggests(isolated):
    with pytest.raises(FedmedError, match=r"unknown config key 'federation.roundz'.*'federation.rounds'"):
        compose("fit", [*isolated, "federation.roundz=3"])


def test_group_typo_lists_options(isolated):
    with pytest.raises(FedmedError,
                       match=r"no option .pneumonia. for config group .data.*pneumoniamnist.*data=pneumoniamnist"):
        compose("fit", [*isolated, "data=pneumonia"])


def test_unknown_site_in_federation_is_named(isolated):
    cfg = compose("fit", [*isolated, "federation.sites=[hospital_a,hospital_zz]"])
    with pytest.raises(FedmedError, match="hospital_zz"):
        site_config(cfg, "hospital_zz")


def test_cli_help_lists_verbs_and_groups(capsys):
    assert main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for g in ("data", "model", "partition", "federation", "site", "experiment"):
        assert g in out
    assert "pneumoniamnist" in out and "smoke" in out


def test_cli_errors_are_one_line_not_tracebacks(capsys):
    assert main(["fit", "federation.roundz=3"]) == 1
    err = capsys.readouterr().err
    assert "federation.rounds" in err and "Traceback" not in err
    assert main(["fitt"]) == 2
    assert main(["fit", "--rounds"]) == 1


def test_config_dir_is_the_repo_configs():
    assert (config_dir() / "fit.yaml").exists()


def test_missing_mandatory_value_is_named(isolated, capsys):
    with pytest.raises(FedmedError, match="checkpoint"):
        compose("explain", isolated)
    assert main(["explain", *isolated]) == 1
    err = capsys.readouterr().err
    assert "checkpoint=" in err and "Traceback" not in err


def test_explain_configs_compose(isolated):
    cfg = compose("explain", [*isolated, "checkpoint=x.pt", "data=breastmnist"])
    assert cfg.method == "gradcam" and cfg.data.name == "breastmnist"


def test_every_primary_config_composes(isolated):
    """Each verb's own config (configs/<verb>.yaml) composes, with its mandatory values given."""
    needs = {"explain": ["checkpoint=x.pt"], "audit_privacy": ["checkpoint=x.pt"], "evaluate": ["checkpoint=x.pt"]}
    verbs = sorted(p.stem for p in config_dir().glob("*.yaml"))
    assert {"fit", "explain", "data_check", "serve", "audit_privacy", "evaluate"} <= set(verbs)
    for verb in verbs:
        cfg = compose(verb, [*isolated[:1], *needs.get(verb, [])]) if verb == "data_check" else \
            compose(verb, [*isolated, *needs.get(verb, [])])
        assert cfg.data.name == "pneumoniamnist", verb
    serve = compose("serve", isolated)
    assert serve.federation.server == "0.0.0.0:9092" and serve.privacy.audit == "loss"
    assert set(groups("serve")) >= {"data", "model", "privacy", "federation"}
    assert compose("audit_privacy", [*isolated, "checkpoint=x.pt"]).privacy.audit == "lira"


@pytest.mark.parametrize("override,new", [
    ("federation.strategy=fedprox", "strategy=fedprox"), ("federation.mu=0.1", "strategy.mu=0.1"),
    ("federation.krum_f=2", "strategy.f=2"), ("federation.trim_beta=0.1", "strategy.beta=0.1"),
    ("federation.scaffold_local_lr=0.01", "strategy.local_lr=0.01"),
])
def test_old_strategy_options_name_their_new_spelling(isolated, override, new, capsys):
    with pytest.raises(FedmedError, match=f"use {new}"):
        compose("fit", [*isolated, override])
    assert main(["fit", *isolated, override]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and new in err[0]


def test_strategy_group_sets_its_parameters(isolated):
    cfg = compose("fit", [*isolated, "strategy=fedprox", "strategy.mu=0.3"])
    s = build_strategy(cfg)
    assert s.name == "fedprox" and s.mu == 0.3 and s.configure_fit({}) == {"prox_mu": 0.3}
    with pytest.raises(FedmedError, match="no option 'fedavgg' for config group 'strategy'.*fedavg"):
        compose("fit", [*isolated, "strategy=fedavgg"])


def test_every_key_of_the_config_reference_says_what_it_means():
    import sys

    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_config_reference as reference
    finally:
        sys.path.remove(str(REPO / "docs"))
    tables = reference.load_tables()
    empty = [f"{t.path.relative_to(REPO)}: {r.key}" for t in tables for r in t.rows if not r.meaning]
    assert len(tables) > 30 and not empty, empty[:10]


def test_a_wrong_value_and_the_composed_config_need_no_torch(isolated):
    """Refusals and --cfg come before the heavy imports (torch, Lightning, MONAI): in about a second."""
    import subprocess
    import sys

    probe = ("import sys; from fedmed.cli import main; rc = main(sys.argv[1:]); "
             "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules, 'monai' in sys.modules)")
    for args, rc in ((["fit", "federation.rounds=abc"], 1), (["fit", "site=hospital_d"], 1),
                     (["fit", "data=brain_mri", "data.source.root=/nonexistent"], 1), (["fit", "--cfg"], 0)):
        out = subprocess.run([sys.executable, "-c", probe, *args, *isolated], capture_output=True, text=True,
                             timeout=120).stdout.strip().splitlines()[-1]
        assert out == f"{rc} False False False", (args, out)
    # a strategy's own checks run its class, whose module needs torch, never Lightning or MONAI
    out = subprocess.run([sys.executable, "-c", probe, "fit", "strategy=fedprox", "strategy.mu=-1", *isolated],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "1 True False False" and "strategy.mu must be >= 0" in out.stderr


def test_medmnist_classes_come_from_medmnist_s_own_table():
    import medmnist

    from fedmed.config import medmnist_info

    assert medmnist_info() == medmnist.INFO
