"""The config's schema: every key's type and allowed values, checked right after composition.

A wrong value (``federation.rounds=abc``, ``privacy.delta=2``, ``strategy.mu=-1``) is refused in
one line that names the key, before any data is read or any run is started. Strategy parameters
are typed once, by the strategy class itself: its constructor's annotations give the types, its
own checks give the ranges.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from fedmed.choices import CODECS, EXPLAIN_METHODS, FOLDER_SOURCES, PARTITIONS, SELECTIONS, WEIGHTINGS
from fedmed.errors import FedmedError

MODES = ("federated", "centralized", "local")
AUDITS = ("none", "loss", "lira")
SPLITS = ("train", "val", "test")

#: a rule returns what is wrong with a value (None: nothing), phrased after "expected"
Rule = Callable[[Any], str | None]


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else "an integer" + (f" >= {lo}" if lo is not None else "") + (
            f" and <= {hi}" if hi is not None else "")
    return rule


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def rule(v: Any) -> str | None:
        if not isinstance(v, int | float) or isinstance(v, bool):
            return _range_text("a number", lo, hi, lo_open, hi_open)
        low = lo is None or (v > lo if lo_open else v >= lo)
        high = hi is None or (v < hi if hi_open else v <= hi)
        return None if low and high else _range_text("a number", lo, hi, lo_open, hi_open)
    return rule


def _range_text(what: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    return what


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def choice(*options: Any) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v in options and not isinstance(v, bool) else "one of " + ", ".join(map(str, options))
    return rule


def optional(inner: Rule) -> Rule:
    def rule(v: Any) -> str | None:
        problem = inner(v) if v is not None else None
        return f"null or {problem}" if problem else None
    return rule


def pretrained_source(v: Any) -> str | None:
    """``imagenet``, or a file that exists (checked here: a missing file is refused before anything is imported)."""
    if v == "imagenet" or (isinstance(v, str) and Path(v).expanduser().is_file()):
        return None
    return "imagenet or an existing file of weights" + (f" (no file {v})" if isinstance(v, str) else "")


def names(v: Any) -> str | None:
    ok = isinstance(v, list | tuple | ListConfig) and len(v) > 0 and all(isinstance(s, str) for s in v)
    return None if ok else "a non-empty list of names, e.g. [hospital_a,hospital_b]"


PROB = number(0, 1)
POSITIVE = number(0, lo_open=True)

#: keys every verb's config may hold (checked where present)
RULES: dict[str, Rule] = {
    "seed": integer(0), "mode": choice(*MODES), "run_name": optional(text), "resume": optional(text),
    "federation.sites": names, "federation.rounds": integer(1), "federation.local_epochs": integer(1),
    "federation.fraction": number(0, 1, lo_open=True), "federation.min_sites": integer(1),
    "federation.site_timeout": optional(POSITIVE), "federation.select": choice(*SELECTIONS),
    "federation.finetune_epochs": integer(0), "federation.compression": choice(*CODECS),
    "federation.average_from": optional(integer(1)), "federation.weighting": choice(*WEIGHTINGS),
    "federation.calibrate_from": optional(integer(1)),
    "federation.topk_fraction": number(0, 1, lo_open=True), "federation.error_feedback": boolean,
    "federation.parallel": integer(0), "federation.server": optional(text), "federation.connect_timeout": POSITIVE,
    "federation.attack_scale": number(), "federation.checkpoint_dir": text,
    "partition.method": choice(*PARTITIONS), "partition.alpha": optional(POSITIVE), "partition.min_samples": integer(0),
    "data.batch_size": integer(1), "data.num_classes": integer(2), "data.cache": choice("memory", "disk"),
    "data.cache_workers": integer(0), "data.spatial_dims": choice(2, 3),
    "data.transforms.size": optional(integer(1)), "data.transforms.channels": choice(1, 3),
    "data.transforms.intensity": choice("uint8", "minmax", "percentile", "none"),
    "data.transforms.zscore": boolean,
    "data.transforms.colour": optional(choice("shades_of_gray")), "data.transforms.colour_power": number(1),
    "data.transforms.augment.flip_prob": PROB, "data.transforms.augment.affine_prob": PROB,
    "data.transforms.augment.rotate_degrees": number(0, 180),
    "data.transforms.augment.zoom": number(0, 1, hi_open=True),
    "data.transforms.augment.brightness_prob": PROB, "data.transforms.augment.contrast_prob": PROB,
    "data.transforms.augment.cutout_prob": PROB, "data.transforms.augment.cutout_holes": integer(0),
    "data.transforms.augment.cutout_size": integer(1),
    "model.logit_adjust": number(0), "model.logit_prior": choice("site", "federation"),
    "model.decorrelation": number(0), "model.freeze_head": boolean,
    "model.pretrained": optional(pretrained_source),
    "federation.calibrate_head": boolean, "federation.calibrate_samples": integer(10),
    "federation.calibrate_epochs": integer(1), "federation.calibrate_lr": POSITIVE,
    "federation.calibrate_min_images": integer(1),
    "federation.style_mix": PROB, "federation.style_band": number(0, 0.5, lo_open=True),
    "model.optimizer.name": choice("adam", "sgd"), "model.optimizer.lr": POSITIVE,
    "model.optimizer.momentum": number(0, 1, hi_open=True), "model.optimizer.keep_state": boolean,
    "model.optimizer.weight_decay": number(0), "model.optimizer.schedule": choice("constant", "cosine"),
    "model.optimizer.min_lr_ratio": PROB, "model.optimizer.sam_rho": number(0),
    "model.fix_batchnorm_from": optional(integer(1)),
    "model.net.dropout": number(0, 1, hi_open=True),
    "model.net.hidden": integer(1), "model.net.norm": choice("batch", "group"), "model.net.norm_groups": integer(1),
    "trainer.accelerator": choice("cpu", "gpu", "cuda", "mps", "auto"), "trainer.deterministic": boolean,
    "trainer.limit_train_batches": optional(POSITIVE), "trainer.limit_val_batches": optional(number(0)),
    "logger.log_model": boolean, "logger.experiment": text, "logger.tracking_uri": text,
    "privacy.epsilon": optional(POSITIVE), "privacy.delta": number(0, 1, lo_open=True, hi_open=True),
    "privacy.noise_multiplier": optional(number(0)), "privacy.max_grad_norm": POSITIVE,
    "privacy.budget": optional(POSITIVE), "privacy.accountant": choice("rdp", "prv", "gdp"),
    "privacy.statistics_noise": optional(POSITIVE), "privacy.statistics_clip": POSITIVE,
    "privacy.secure_aggregation": boolean, "privacy.audit": choice(*AUDITS), "privacy.audit_n": integer(1),
    "privacy.audit_shadows": integer(4),  # LiRA: every candidate IN for >= 2 and OUT for >= 2 shadow models
    "explain.every_n_rounds": integer(0), "explain.method": choice(*EXPLAIN_METHODS), "explain.n": integer(1),
}
#: top-level keys of one verb's own config
VERB_RULES: dict[str, dict[str, Rule]] = {
    "explain": {"checkpoint": text, "split": choice(*SPLITS), "n": integer(1),
                "method": choice(*EXPLAIN_METHODS, "all"), "target": choice("predicted", "true"),
                "per_class": integer(0), "faithfulness": boolean, "output_dir": text, "report": boolean},
    "audit_privacy": {"checkpoint": text, "epochs": optional(integer(1))},
    "data_check": {"manifests": boolean, "workers": integer(1)},
    "evaluate": {"checkpoint": text, "split": choice(*SPLITS, "all"), "n_boot": integer(100), "seed": integer(0),
                 "bins": integer(2), "reproduce": optional(text), "output_dir": text,
                 "sites": lambda v: None if v is None or v == "all" or names(v) is None
                 else "all or a list of site names, e.g. [rosendahl,vienna_dias]"},
}


def validate(cfg: DictConfig, verb: str = "fit", strategy: bool = True) -> None:
    """Check every key of ``cfg`` that has a rule, the data folder, the site and (``strategy``) the
    strategy's parameters. All but the last need no torch, Lightning or MONAI: they come first.

    Raises:
        FedmedError: one line naming the first wrong key, its value and what is expected.
    """
    for key, rule in {**RULES, **VERB_RULES.get(verb, {})}.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        plain = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        problem = rule(plain)
        if problem:
            raise FedmedError(f"{key}={plain!r}: expected {problem}")
    fed = cfg.get("federation")
    for key in ("average_from", "calibrate_from"):
        first = fed.get(key) if fed is not None else None
        if first is not None and first > fed.get("rounds", first):
            raise FedmedError(f"federation.{key}={first}: expected a round from 1 to federation.rounds={fed.rounds} "
                              "(or null)")
    if verb == "data_check" and cfg.get("splits") is not None:
        bad = [s for s in cfg.splits if s not in SPLITS]
        if bad:
            raise FedmedError(f"splits={list(cfg.splits)}: expected a list of {', '.join(SPLITS)}")
    _check_data_dir(cfg)
    if verb not in ("evaluate", "explain"):  # they score sites that never trained too
        _check_site(cfg)
    if strategy and cfg.get("strategy") is not None:
        check_strategy(cfg)


_ABSENT = object()


def strategy_parameters(cls: type) -> dict[str, Any]:
    """The parameters a strategy class takes (its own and its bases'), with their annotated types."""
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        hints = typing.get_type_hints(init)
        for name, p in inspect.signature(init).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params[name] = hints.get(name, Any)
    return params


def _type_problem(value: Any, hint: Any) -> str | None:
    allowed = typing.get_args(hint) or (hint,)
    for t in allowed:
        if t is Any or (t is type(None) and value is None):
            return None
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if t in (str, bool) and isinstance(value, t):
            return None
    return " or ".join(getattr(t, "__name__", str(t)) for t in allowed)


def check_strategy(cfg: DictConfig) -> None:
    """``strategy.*``: known parameters of the strategy class, of the annotated types, accepted by it."""
    from fedmed.federated.strategies.base import Strategy  # torch: after every check that needs none

    node = cfg.strategy
    target = node.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - any import failure names the key
        raise FedmedError(f"strategy._target_={target!r}: no such class") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise FedmedError(f"strategy._target_={target!r} is not a fedmed Strategy")
    params = strategy_parameters(cls)
    for key, value in node.items():
        if key == "_target_":
            continue
        if key not in params or key == "num_sites":
            known = ", ".join(sorted(k for k in params if k != "num_sites")) or "none"
            raise FedmedError(f"strategy.{key}: {cls.name} has no such parameter (it takes: {known})")
        problem = _type_problem(value, params[key])
        if problem:
            raise FedmedError(f"strategy.{key}={value!r}: expected {problem}")
    sites = cfg.get("federation", {}).get("sites") or []
    try:
        instantiate(node, num_sites=len(sites) or None)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, FedmedError):
            raise cause from None
        raise FedmedError(f"strategy={cls.name}: {cause}") from None


def _check_site(cfg: DictConfig) -> None:
    """``site=<name>`` (a site alone, or one joining a federation) must be one of ``federation.sites``."""
    site, fed = cfg.get("site"), cfg.get("federation")
    if not site or fed is None or site.get("name") is None:
        return
    sites = [str(s) for s in fed.sites]
    if str(site.name) not in sites:
        raise FedmedError(f"site={site.name} is not one of federation.sites {sites}: a site trains on its share of "
                          "the federation's partition; name it there too, e.g. federation.sites="
                          f"[{','.join([*sites, str(site.name)])}]")


def _check_data_dir(cfg: DictConfig) -> None:
    """``FEDMED_DATA_DIR`` must name an existing folder (a missing default folder is created on download), and
    a source that reads a folder of its own needs that folder."""
    given = os.environ.get("FEDMED_DATA_DIR")
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    if given and data_dir == given and not Path(given).expanduser().is_dir():
        raise FedmedError(f"paths.data_dir={given} (from FEDMED_DATA_DIR) is not a folder; point FEDMED_DATA_DIR "
                          "at the folder that holds the data")
    target = str(OmegaConf.select(cfg, "data.source._target_", default="") or "")
    root = OmegaConf.select(cfg, "data.source.root", default=None)
    if target.rsplit(".", 1)[-1] in FOLDER_SOURCES and root and not Path(str(root)).expanduser().is_dir():
        raise FedmedError(f"data.source.root={root}: no such folder (data={cfg.data.get('name')}); put the data "
                          "there, or point FEDMED_DATA_DIR at the folder that holds it (docs: datasets)")
