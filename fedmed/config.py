"""Compose Hydra configs for a verb, with errors that name the offending key or group."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedmed.errors import FedmedError

PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """fedmed's own configs: inside the installed package (``fedmed/configs``), or ``configs/`` of a source checkout."""
    for c in (PACKAGE / "configs", PACKAGE.parent / "configs"):
        if (c / "fit.yaml").exists():
            return c
    raise FedmedError(f"fedmed's configs are missing from {PACKAGE}; reinstall fedmed")


def user_config_dir() -> Path | None:
    """``$FEDMED_CONFIG_DIR``: the user's own config folder, searched before fedmed's (e.g. ``site/<name>.yaml``)."""
    env = os.environ.get("FEDMED_CONFIG_DIR")
    if not env:
        return None
    path = Path(env).expanduser().resolve()
    if not path.is_dir():
        raise FedmedError(f"FEDMED_CONFIG_DIR={env} is not a folder")
    return path


def config_dirs() -> list[Path]:
    """Where config files are looked up, first match wins: the user's folder, then fedmed's."""
    user = user_config_dir()
    return [user, config_dir()] if user else [config_dir()]


def find_config(relative: str) -> Path | None:
    """The first ``<dir>/<relative>`` of :func:`config_dirs` that exists."""
    return next((d / relative for d in config_dirs() if (d / relative).is_file()), None)


def reference_manifests() -> str:
    """The committed manifests behind the published results (a source checkout's ``data_manifests/``), or ''."""
    path = PACKAGE.parent / "data_manifests"
    return str(path) if (PACKAGE.parent / "pyproject.toml").is_file() and path.is_dir() else ""


def site_manifest(relative: str, *, _root_: DictConfig) -> str:
    """A site's manifest: the committed reference one where it exists, else under ``paths.manifests``."""
    ref = _root_.paths.get("reference_manifests")
    if ref and (Path(ref) / relative).is_file() and _same_sites(Path(ref) / relative, _root_):
        return str(Path(ref) / relative)
    return str(Path(_root_.paths.manifests) / relative)


def _same_sites(manifest: Path, cfg: DictConfig) -> bool:
    """Whether a reference manifest was drawn for this run's sites (a natural partition's folder name
    does not say how many sites it has)."""
    import json

    try:
        sites = json.loads(manifest.read_text()).get("partition", {}).get("sites")
    except (OSError, ValueError):
        return False
    wanted = OmegaConf.select(cfg, "federation.sites", default=None)
    return sites is None or wanted is None or list(sites) == list(wanted)


#: options that moved: old key -> (new key, the strategy it belongs to)
RENAMED = {
    "federation.mu": ("strategy.mu", "fedprox"), "federation.bn_stats": ("strategy.bn_stats", None),
    "federation.server_lr": ("strategy.server_lr", "fedadam"), "federation.beta1": ("strategy.beta1", "fedadam"),
    "federation.beta2": ("strategy.beta2", "fedadam"), "federation.tau": ("strategy.tau", "fedadam"),
    "federation.scaffold_server_lr": ("strategy.server_lr", "scaffold"),
    "federation.scaffold_local_lr": ("strategy.local_lr", "scaffold"),
    "federation.trim_beta": ("strategy.beta", "trimmed_mean"), "federation.krum_f": ("strategy.f", "krum"),
    "federation.krum_m": ("strategy.m", "krum"),
}


def check_renamed(overrides: list[str] | tuple[str, ...]) -> None:
    """One line naming the new spelling of an option that moved (e.g. ``federation.strategy=fedprox``)."""
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key == "federation.strategy":
            raise FedmedError(f"federation.strategy is now the config group strategy: use strategy={value} "
                              "(its parameters are strategy.*, e.g. strategy.mu=0.01)")
        if key in ("federation.auth.tokens_file", "federation.auth.token_file"):
            raise FedmedError(f"{key}: token files are gone; sites authenticate with Flower's SuperNode keys: "
                              "federation.auth.supernode_keys (server) and federation.auth.private_key (site)")
        if key in RENAMED:
            new, belongs = RENAMED[key]
            where = f" (with strategy={belongs})" if belongs else ""
            raise FedmedError(f"{key} is now {new}{where}: use {new}={value}")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("fedmed_cwd"):
        OmegaConf.register_new_resolver("fedmed_cwd", lambda: os.getcwd())
    if not OmegaConf.has_resolver("fedmed_reference_manifests"):
        OmegaConf.register_new_resolver("fedmed_reference_manifests", reference_manifests)
    if not OmegaConf.has_resolver("site_manifest"):
        OmegaConf.register_new_resolver("site_manifest", site_manifest)
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda x: len(x))
    if not OmegaConf.has_resolver("or"):  # first value that is set, e.g. a dataset's own site list
        OmegaConf.register_new_resolver("or", _first_set)
    if not OmegaConf.has_resolver("class_folders"):  # number of class folders of an image-folder dataset
        OmegaConf.register_new_resolver("class_folders", _class_folders)
    if not OmegaConf.has_resolver("medmnist"):
        OmegaConf.register_new_resolver("medmnist", _medmnist_info)


def _class_folders(root: str, folder: str) -> int:
    path = Path(root).expanduser() / folder
    if not path.is_dir():
        raise FedmedError(f"data.source.root: {path} is not a folder (expected <root>/<split>/<class>/images)")
    return sum(1 for p in path.iterdir() if p.is_dir())


def _first_set(*values):
    value = next((v for v in values if v is not None), None)
    return OmegaConf.create(value) if isinstance(value, (list, dict)) else value


def _medmnist_info(name: str, key: str):
    """``${medmnist:<flag>,classes|channels}`` from medmnist's INFO (e.g. for data=medmnist data.name=bloodmnist)."""
    known = medmnist_info()
    if name not in known:
        raise FedmedError(f"data.name={name!r} is not a MedMNIST dataset; known: {', '.join(sorted(known))}")
    info = known[name]
    return {"classes": len(info["label"]), "channels": info["n_channels"]}[key]


def medmnist_info() -> dict:
    """medmnist's ``INFO`` table, read from its ``info`` module alone: importing the ``medmnist`` package
    imports torch, and a config must be checked in about a second."""
    import importlib.util

    spec = importlib.util.find_spec("medmnist")
    origin = Path(spec.origin).with_name("info.py") if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        import medmnist

        return dict(medmnist.INFO)
    loader = importlib.util.spec_from_file_location("_fedmed_medmnist_info", origin)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return dict(module.INFO)


def groups(verb: str = "fit") -> dict[str, list[str]]:
    """The config groups ``configs/<verb>.yaml`` uses, and their options, e.g. ``{"data": ["breastmnist", ...]}``."""
    root = config_dir()
    defaults = OmegaConf.to_container(OmegaConf.load(root / f"{verb}.yaml")).get("defaults", [])  # type: ignore[union-attr]
    used: dict[str, list[str]] = {}
    for d in defaults:
        if isinstance(d, str) and (root / f"{d}.yaml").is_file() and d != verb:  # an included primary (serve: fit)
            used.update(groups(d))
        elif isinstance(d, dict):
            g = next(iter(d))
            if (root / g).is_dir():  # with the options the user's own config folder adds
                used[g] = sorted({p.stem for c in config_dirs() for p in (c / g).glob("*.yaml")})
    return used


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg:
        path = f"{prefix}{k!s}"
        keys.append(path)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            keys += _all_keys(node, f"{path}.")
    return keys


def compose(verb: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``configs/<verb>.yaml`` with Hydra-style ``overrides`` and resolve every interpolation.

    Raises:
        FedmedError: unknown key (with a suggestion), unknown group option, or a value that
            does not resolve.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_renamed(overrides)
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=verb, overrides=[*_search_path(), *overrides])
        except HydraException as exc:
            raise FedmedError(_explain_override_error(exc, verb, overrides)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise FedmedError(f"config value does not resolve: {exc}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FedmedError(f"`fedmed {_cmd(verb)}` needs a value for {', '.join(missing)}, "
                          f"e.g. `fedmed {_cmd(verb)} {missing[0]}=...` "
                          f"(`fedmed {_cmd(verb)} --help` shows examples)")
    return cfg


def _search_path() -> list[str]:
    user = user_config_dir()
    return [f"hydra.searchpath=[file://{user}]"] if user else []


def _explain_override_error(exc: Exception, verb: str, overrides) -> str:
    msg = str(exc)
    if "is not in struct" in msg or "Could not override" in msg or "Key '" in msg:
        for ov in overrides:
            key = ov.lstrip("+~").split("=", 1)[0]
            if key and f"'{key}'" in msg:
                base = _compose_plain(verb)
                known = _all_keys(base)
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                return (f"unknown config key '{key}' in override '{ov}'.{hint} "
                        f"(`fedmed {_cmd(verb)} --cfg` shows every key.)")
    found = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", msg)
    if found:
        group, option = found.groups()
        options = groups(verb).get(group, [])
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return (f"no option {option!r} for config group '{group}' (configs/{group}/{option}.yaml); "
                f"options: {', '.join(options)}.{hint}")
    return f"bad override in {list(overrides)}: {msg.strip()}"


def _compose_plain(verb: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=verb, overrides=_search_path())


def site_config(cfg: DictConfig, name: str, verb: str = "fit") -> DictConfig:
    """The resolved ``site`` node for site ``name`` under the run's current config."""
    _register_resolvers()  # also in a worker process that loads a saved config instead of composing one
    path = find_config(f"site/{name}.yaml")
    if path is None:
        known = groups(verb).get("site", [])
        where = " or ".join(str(d / "site") for d in config_dirs())
        raise FedmedError(f"federation.sites names {name!r}, but there is no {name}.yaml in {where}; sites: {known}")
    node = OmegaConf.load(path)
    merged = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=True), {"site": node})
    OmegaConf.resolve(merged)
    return merged.site


def _cmd(verb: str) -> str:
    """How the user types a verb: data_check -> data check."""
    return verb.replace("_", " ")
