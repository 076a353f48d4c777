"""The builders every verb shares: a composed config in, fedmed's objects out.

Nothing here runs training or logs anything: each function reads its part of the config,
checks it, and returns objects (a network, a strategy, a site client, settings).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline, SiteData
from fedmed.data.manifest import Manifest
from fedmed.data.sites import ensure_manifests, plan_manifests, write_new
from fedmed.data.style import STYLE_SPECTRUM
from fedmed.errors import FedmedError
from fedmed.evaluation.sites import SiteImages
from fedmed.federated.attack import ATTACKS, Attack
from fedmed.federated.channel import UpdateChannel
from fedmed.federated.checkpoint import CHECKPOINT, load_checkpoint, unsafe_reason
from fedmed.federated.compression import UpdateEncoder
from fedmed.federated.heatmaps import ExplainSettings, SiteHeatmaps
from fedmed.federated.messages import RoundRecord
from fedmed.federated.orchestrator import FederationSettings
from fedmed.federated.site import SiteClient
from fedmed.federated.statistics import CLASS_FEATURES, LABEL_COUNTS, HeadCalibration
from fedmed.federated.strategies.base import Strategy
from fedmed.federated.training import TrainingSettings
from fedmed.models.classifier import Classifier
from fedmed.models.registry import MODELS, class_names
from fedmed.privacy.dp import DPConfig, dp_compatible, planned_releases
from fedmed.privacy.identity import Signer
from fedmed.tracking import RunLog

log = logging.getLogger("fedmed")



def resolve_mode(cfg: DictConfig) -> str:
    """``federated``, ``centralized``, or ``local`` (implied by ``site=<name>``)."""
    mode = "local" if cfg.get("site") else cfg.mode
    if mode == "local" and not cfg.get("site"):
        raise FedmedError("mode=local needs a site: fedmed fit site=<name>")
    return mode


def dp_config(cfg: DictConfig) -> DPConfig | None:
    """The run's DP-SGD settings (``privacy.*``), or None when DP is off."""
    p = cfg.get("privacy")
    return DPConfig.from_config(OmegaConf.to_container(p, resolve=True)) if p is not None else None  # type: ignore[arg-type]


def build_net(cfg: DictConfig) -> tuple[torch.nn.Module, list[str]]:
    """The network of ``cfg.model``; with DP on, made DP-compatible (BatchNorm -> GroupNorm). Returns (net, changes)."""
    try:
        net = instantiate(cfg.model.net, _convert_="all")
    except InstantiationException as exc:  # Hydra wraps the network's own ValueError: show that, with the key
        cause = exc.__cause__ or exc
        raise FedmedError(f"model.net ({cfg.model.net.get('_target_')}): {cause}") from exc
    if dp_config(cfg) is None:
        return net, []
    return dp_compatible(net)


def build_module(cfg: DictConfig) -> Classifier:
    """The Lightning classifier for ``cfg.model`` on ``cfg.data``."""
    net, _ = build_net(cfg)
    opt = cfg.model.optimizer  # its choices are checked with their keys by fedmed.schema
    return Classifier(net, cfg.data.num_classes, lr=opt.lr, weight_decay=opt.weight_decay,
                      logit_adjust=cfg.model.get("logit_adjust", 0.0), lr_schedule=opt.get("schedule", "constant"),
                      min_lr_ratio=opt.get("min_lr_ratio", 0.05), optimizer=opt.get("name", "adam"),
                      momentum=opt.get("momentum", 0.9),
                      keep_state=opt.get("keep_state", False), decorrelation=cfg.model.get("decorrelation", 0.0),
                      freeze_head=cfg.model.get("freeze_head", False), sam_rho=opt.get("sam_rho", 0.0),
                      fix_batchnorm_from=cfg.model.get("fix_batchnorm_from"))


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The weights a run starts from: a fresh network, or its body from ``model.pretrained``."""
    net = build_module(cfg).net
    source = cfg.model.get("pretrained")
    if source:
        from fedmed.models.pretrained import load_pretrained

        load_pretrained(net, str(source))
    return net.state_dict()


def build_strategy(cfg: DictConfig, num_sites: int | None = None) -> Strategy:
    """The ``strategy`` config node (``configs/strategy/<name>.yaml``) as an object."""
    try:
        strategy = instantiate(cfg.strategy, num_sites=num_sites or len(cfg.federation.sites))
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, FedmedError):
            raise cause from None
        raise FedmedError(f"strategy ({cfg.strategy.get('_target_')}): {cause}") from None
    if not isinstance(strategy, Strategy):
        raise FedmedError(f"strategy._target_={cfg.strategy.get('_target_')} is not a fedmed Strategy")
    return strategy


def check_settings(cfg: DictConfig, mode: str) -> Strategy | None:
    """Refuse combinations that would not do what they say (strategy vs model, DP, secure aggregation),
    before anything runs. Returns the federation's strategy (None for a baseline)."""
    secure = bool(cfg.privacy.secure_aggregation)
    if secure and cfg.federation.compression != "none":
        raise FedmedError("privacy.secure_aggregation with federation.compression: a masked update is dense "
                          "64-bit fixed point, so compression would buy nothing; choose one")
    if secure and mode != "federated":
        raise FedmedError("privacy.secure_aggregation applies to federations, not to local or centralized runs")
    attackers(cfg)
    shared = [key for key, on in (("model.logit_prior=federation", label_prior(cfg) == "federation"),
                                  ("federation.calibrate_head=true", bool(cfg.federation.get("calibrate_head"))))
              if on]
    dp = dp_config(cfg)
    if dp is not None and balanced(cfg):
        raise FedmedError("federation.weighting=balanced with DP-SGD (privacy.epsilon or privacy.noise_multiplier): "
                          "each site's weight comes from its exact label counts, which DP-SGD does not noise; "
                          "use federation.weighting=examples")
    if shared and dp is not None and dp.statistics_noise is None:  # secure aggregation masks them like updates
        raise FedmedError(f"{shared[0]} with DP-SGD needs privacy.statistics_noise: the class statistics are noised "
                          "and counted in each site's epsilon (e.g. privacy.statistics_noise=20)")
    if dp is not None and cfg.model.get("decorrelation"):
        raise FedmedError(f"model.decorrelation={cfg.model.decorrelation}: expected 0 with DP-SGD on (privacy.epsilon "
                          "or privacy.noise_multiplier): the penalty couples a batch's images, DP-SGD clips each "
                          "image's gradient alone")
    if dp is not None and cfg.model.optimizer.get("sam_rho"):
        raise FedmedError(f"model.optimizer.sam_rho={cfg.model.optimizer.sam_rho}: expected 0 with DP-SGD on "
                          "(privacy.epsilon or privacy.noise_multiplier): sharpness-aware steps take two gradients "
                          "per batch, DP-SGD accounts for one")
    fix_bn = cfg.model.get("fix_batchnorm_from")
    if fix_bn is not None:
        epochs = cfg.federation.rounds * cfg.federation.local_epochs
        if fix_bn > epochs:
            raise FedmedError(f"model.fix_batchnorm_from={fix_bn}: after the run's last epoch ({epochs} = "
                              "federation.rounds x federation.local_epochs); use an epoch within it, or null")
        if dp is not None or cfg.model.net.get("norm", "batch") != "batch":
            raise FedmedError(f"model.fix_batchnorm_from={fix_bn}: this network has no BatchNorm layers "
                              "(model.net.norm=group, or DP-SGD, which replaces them with GroupNorm); use null")
    every_round = cfg.federation.get("calibrate_from")
    if every_round is not None and not cfg.federation.get("calibrate_head"):
        raise FedmedError(f"federation.calibrate_from={every_round}: needs federation.calibrate_head=true (it "
                          "calibrates the head of every round's model from that round on)")
    if every_round is not None and dp is not None:
        raise FedmedError(f"federation.calibrate_from={every_round}: expected null with DP-SGD on (privacy.epsilon or "
                          "privacy.noise_multiplier): a site sends its noisy feature statistics once, and this asks "
                          "for them every round")
    style_mix = float(cfg.federation.get("style_mix", 0.0))
    if style_mix and (secure or dp is not None):
        other = "privacy.secure_aggregation" if secure else "DP-SGD (privacy.epsilon or privacy.noise_multiplier)"
        raise FedmedError(f"federation.style_mix={style_mix} with {other}: each site's style spectrum leaves it "
                          "unmasked and unnoised; use federation.style_mix=0")
    if style_mix and int(cfg.data.get("spatial_dims", 2)) != 2:
        raise FedmedError(f"federation.style_mix={style_mix}: expected 0 for 3D volumes (data.spatial_dims=3); the "
                          "style spectrum is that of 2D images")
    if dp is not None:
        planned_releases(dp, releases(cfg, mode == "federated"))
    if mode != "federated":
        return None
    strategy = build_strategy(cfg)
    name = strategy.name
    if strategy.needs_batchnorm and cfg.model.net.get("norm", "batch") != "batch":
        raise FedmedError(f"strategy={name} with model.net.norm={cfg.model.net.norm}: {name} keeps each site's "
                          "BatchNorm layers local, and this model has none. Use model.net.norm=batch, or another "
                          "strategy.")
    if dp_config(cfg) is not None and strategy.dp_incompatible:
        raise FedmedError(f"privacy.epsilon/noise_multiplier (DP-SGD) with strategy={name}: "
                          f"{strategy.dp_incompatible}. Use a strategy whose sites train plainly.")
    if secure and not strategy.summable:
        raise FedmedError(f"privacy.secure_aggregation with strategy={name}: secure aggregation shows the server "
                          "only the sum of the updates, and this strategy needs each one")
    return strategy


def attackers(cfg: DictConfig) -> dict[str, str]:
    """``federation.attackers=[hospital_d:signflip]`` -> {"hospital_d": "signflip"}."""
    out = {}
    for item in cfg.federation.get("attackers") or []:
        site, sep, kind = str(item).partition(":")
        if not sep or site not in cfg.federation.sites or kind not in ATTACKS:
            raise FedmedError(f"federation.attackers entry {item!r} must be <site>:<{'|'.join(ATTACKS)}> with a "
                              f"site of federation.sites {list(cfg.federation.sites)}")
        out[site] = kind
    return out


def site_data(cfg: DictConfig, manifest: Manifest, site_cfg: DictConfig) -> SiteData:
    """A site's data: its manifest, read against the site's own copy of the source, and (natural
    partitions) the test images of its own source."""
    own = instantiate(cfg.data.source, root=site_cfg.data_root)
    pipeline = Pipeline.from_config(cfg.data, own)
    data = pipeline.site(manifest, masks=True)  # evidence masks: scored against explanations only
    if cfg.partition.get("method") == "natural":
        rows = SiteImages(str(site_cfg.name), cfg.data, own, cfg.partition, "test", "internal").rows("test")
        if rows is not None and len(rows):
            data.test = pipeline.dataset("test", rows)
    return data


def _partition_args(cfg: DictConfig) -> tuple:
    p = cfg.partition
    sites = list(cfg.federation.sites)
    return (sites, [site_config(cfg, s).manifest for s in sites], p.method, p.alpha, cfg.seed, p.min_samples,
            p.get("column"), OmegaConf.to_container(p.groups) if p.get("groups") else None)


def write_partition(cfg: DictConfig, source) -> None:
    """Write the federation's site manifests unless they exist (they are never overwritten)."""
    ensure_manifests(source, *_partition_args(cfg))


def load_sites(cfg: DictConfig, source, sites: list[str]) -> tuple[dict[str, Manifest], dict[str, SiteData]]:
    """The manifests and decoded data of ``sites``; manifests this run draws are written only once every
    site's data has loaded, so a corrupt or missing image leaves nothing behind."""
    plan = plan_manifests(source, *_partition_args(cfg))
    manifests = {s: m for s, (_, m, _) in zip(cfg.federation.sites, plan, strict=True)}
    data = {s: site_data(cfg, manifests[s], site_config(cfg, s)) for s in sites}
    write_new(plan)
    return {s: manifests[s] for s in sites}, data


def label_prior(cfg: DictConfig) -> str:
    """``model.logit_prior`` where the loss is logit-adjusted (``site`` otherwise: no prior is used)."""
    return str(cfg.model.get("logit_prior", "site")) if cfg.model.get("logit_adjust", 0.0) else "site"


def balanced(cfg: DictConfig) -> bool:
    """``federation.weighting=balanced``: each site weighs its update by its class-balanced share."""
    return cfg.federation.get("weighting", "examples") == "balanced"


def shares(cfg: DictConfig, federated: bool) -> frozenset[str]:
    """What a site of this config tells the server beyond its updates (:mod:`fedmed.federated.statistics`)."""
    if not federated:
        return frozenset()
    out = {LABEL_COUNTS} if label_prior(cfg) == "federation" or balanced(cfg) else set()
    if cfg.federation.get("calibrate_head"):
        out |= {LABEL_COUNTS, CLASS_FEATURES}
    if cfg.federation.get("style_mix", 0.0):
        out.add(STYLE_SPECTRUM)
    return frozenset(out)


def releases(cfg: DictConfig, federated: bool) -> tuple[str, ...]:
    """The class statistics a site's training images go into beyond its updates (each once): the label counts
    for the federation's prior or the balanced weighting, the feature moments for head calibration (also of a
    local or centralized run)."""
    prior = federated and (label_prior(cfg) == "federation" or balanced(cfg))
    return tuple(r for r, on in ((LABEL_COUNTS, prior), (CLASS_FEATURES, bool(cfg.federation.get("calibrate_head"))))
                 if on)


def training_settings(cfg: DictConfig, federated: bool) -> TrainingSettings:
    """How every site trains; ``federated`` adds the fine-tuning epochs to the planned ones."""
    fed = cfg.federation
    planned = fed.rounds * fed.local_epochs + (fed.finetune_epochs if federated else 0)
    return TrainingSettings(batch_size=cfg.data.batch_size,
                            trainer=OmegaConf.to_container(cfg.trainer, resolve=True),  # type: ignore[arg-type]
                            seed=cfg.seed, planned_epochs=planned, privacy=dp_config(cfg),
                            shares=shares(cfg, federated),
                            min_class_images=int(fed.get("calibrate_min_images", 10)),
                            releases=releases(cfg, federated),
                            label_prior=label_prior(cfg) if federated else "site",
                            weighting="balanced" if federated and balanced(cfg) else "examples",
                            style_mix=float(fed.get("style_mix", 0.0)) if federated else 0.0,
                            style_band=float(fed.get("style_band", 0.1)))


def head_calibration(cfg: DictConfig) -> HeadCalibration | None:
    """``federation.calibrate_head``: how the server re-fits the classifier layer (None: off)."""
    fed = cfg.federation
    if not fed.get("calibrate_head"):
        return None
    return HeadCalibration(samples=int(fed.calibrate_samples), epochs=int(fed.calibrate_epochs),
                           lr=float(fed.calibrate_lr), seed=int(cfg.seed))


def site_client(cfg: DictConfig, name: str, index: int, data: SiteData, run: RunLog | None = None,
                class_names: list[str] | None = None, strategy: Strategy | None = None,
                signer: Signer | None = None, roster: dict[str, bytes] | None = None) -> SiteClient:
    """The SiteClient of ``name``; with a ``strategy`` (a federation) it gets the strategy's site part,
    compression and its attack (if any). ``signer`` and ``roster``: secure aggregation's keys are signed
    and checked (:class:`~fedmed.federated.channel.UpdateChannel`)."""
    fed = cfg.federation
    federated = strategy is not None
    attack = attackers(cfg).get(name) if federated else None
    if attack:
        log.warning("site %s is a test attacker: %s (x%s)", name, attack, fed.attack_scale)
    encoder = (UpdateEncoder(fed.compression, fed.topk_fraction, fed.error_feedback)
               if fed.compression != "none" and federated else None)
    settings = training_settings(cfg, federated)
    heatmaps = SiteHeatmaps(name, data.val, cfg.data.num_classes,
                            ExplainSettings(cfg.explain.method, int(cfg.explain.n)), cfg.seed, class_names,
                            data.val_masks)
    return SiteClient(name, data, lambda: build_module(cfg), settings, index,
                      part=strategy.site_part() if strategy is not None else None,
                      channel=UpdateChannel(name, encoder, signer, roster,
                                            masked_only=federated and bool(cfg.privacy.secure_aggregation)),
                      heatmaps=heatmaps,
                      attack=Attack(attack, float(fed.attack_scale)) if attack else None, run=run,
                      model_config=OmegaConf.to_container(cfg, resolve=True))


def explain_rounds(rounds: int, every: int) -> set[int]:
    """Rounds whose global model the sites explain: every ``every``-th and the last (none if ``every`` is 0)."""
    return {r for r in range(1, rounds + 1) if r % every == 0} | {rounds} if every > 0 else set()


def federation_settings(cfg: DictConfig) -> FederationSettings:
    fed = cfg.federation
    try:
        return FederationSettings(
            rounds=fed.rounds, local_epochs=fed.local_epochs, fraction=fed.fraction, min_sites=fed.min_sites,
            seed=cfg.seed, select=fed.select, explain_rounds=frozenset(explain_rounds(fed.rounds,
                                                                                       cfg.explain.every_n_rounds)),
            site_timeout=fed.site_timeout, secure_aggregation=bool(cfg.privacy.secure_aggregation),
            label_prior=label_prior(cfg) == "federation", num_classes=int(cfg.data.num_classes),
            weighting=str(fed.get("weighting", "examples")),
            average_from=fed.get("average_from"), calibrate_from=fed.get("calibrate_from"),
            style_mix=float(fed.get("style_mix", 0.0)))
    except ValueError as exc:
        raise FedmedError(str(exc)) from None


def find_checkpoint(cfg: DictConfig) -> Path:
    """``resume=<dir or run id>`` -> the server checkpoint file."""
    given = Path(str(cfg.resume)).expanduser()
    for path in (given / CHECKPOINT, given, Path(cfg.federation.checkpoint_dir) / str(cfg.resume) / CHECKPOINT):
        if path.is_file():
            return path
    raise FedmedError(f"resume={cfg.resume}: no {CHECKPOINT} there or in {cfg.federation.checkpoint_dir}/{cfg.resume}/")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def stored_config(cfg: DictConfig) -> DictConfig:
    """The config of the federation ``resume=`` names, as its checkpoint stored it, with this ``resume=``:
    ``fedmed fit resume=<id or folder>`` continues a run without its overrides typed again."""
    path = find_checkpoint(cfg)
    stored = checked_config(load_checkpoint(path).get("config"), f"resume={cfg.resume}: {path}")
    stored.resume = str(cfg.resume)
    return stored


def resume_command(cfg: DictConfig, verb: str, run_id: str) -> str:
    """The command that continues this federation from its last round, as a user types it."""
    return f"fedmed {verb} resume={Path(cfg.federation.checkpoint_dir).expanduser().resolve() / run_id}"


def resume_state(cfg: DictConfig, mode: str, config: Any) -> dict[str, Any]:
    """The server checkpoint ``resume=`` names, checked against this run's config (before any data is read)."""
    if mode != "federated":
        raise FedmedError("resume= continues a federation; local and centralized runs start over")
    path = find_checkpoint(cfg)
    state = load_checkpoint(path)
    checked_config(state.get("config"), f"resume={cfg.resume}: {path}")
    diff = config_diff({k: v for k, v in state["config"].items() if k != "resume"},
                       {k: v for k, v in config.items() if k != "resume"})
    if diff:
        raise FedmedError(f"resume={cfg.resume}: this run's config differs from the one in {path}: "
                          + "; ".join(diff[:5]))
    log.info("resuming MLflow run %s from %s (round %d done)", state["run_id"], path, state["round"])
    return state


def dp_records_from_history(history: list[RoundRecord], later: Mapping[str, Mapping[str, float]] | None = None
                            ) -> dict[str, dict[str, float]]:
    """Each site's last DP report (its fit metrics ``dp_*``): what a server learns from remote sites too; a report in
    ``later`` (a site's accounting after it sent class statistics) replaces it where it spent more."""
    out: dict[str, dict[str, float]] = {}
    for h in history:
        for site, m in h.site_metrics.items():
            if "dp_epsilon" in m:
                out[site] = {"epsilon": m["dp_epsilon"], "delta": m["dp_delta"],
                             "noise_multiplier": m["dp_noise_multiplier"], "dp_steps": int(m["dp_steps"])}
    for site, rec in (later or {}).items():
        if site not in out or rec["epsilon"] >= out[site]["epsilon"]:
            out[site] = {"epsilon": rec["epsilon"], "delta": rec["delta"],
                         "noise_multiplier": rec.get("noise_multiplier", 0.0), "dp_steps": int(rec.get("dp_steps", 0)),
                         "statistics_releases": int(rec.get("statistics_releases", 0))}
    return out


def _targets() -> dict[str, dict[str, type]]:
    """Config key -> the classes a ``_target_`` there may name, in a config that came with a checkpoint."""
    from fedmed import data
    from fedmed.federated import strategies

    def subclasses(base: type) -> tuple[type, ...]:
        found: list[type] = []
        todo: list[type] = [base]
        while todo:
            below: list[type] = []
            for cls in todo:
                below.extend(cls.__subclasses__())
            found += below
            todo = below
        return tuple(found)

    return {"model.net._target_": class_names(MODELS),
            "data.source._target_": class_names(tuple(getattr(data, n) for n in data.__all__
                                                      if n.endswith("Source") and n != "DataSource")),
            "strategy._target_": class_names(subclasses(strategies.Strategy))}


def checked_config(config: Any, where: str) -> DictConfig:
    """The config a checkpoint carries (it comes from elsewhere), refused in one line naming the key if it
    could choose code: a ``_target_`` other than fedmed's own class for that key, or an interpolation."""
    if not isinstance(config, dict):
        raise FedmedError(f"{where}: its 'config' is not a mapping")
    allowed = _targets()

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif key.endswith("_target_"):
            if key not in allowed or node not in allowed[key]:
                raise FedmedError(f"{where}: {key}={node!r} is not one of fedmed's own classes for that key; a "
                                  "checkpoint never chooses code")
        elif isinstance(node, str) and "${" in node:
            raise FedmedError(f"{where}: {key}={node!r} is an interpolation; a checkpoint's config holds values")

    walk(config, "")
    return OmegaConf.create(config)


def load_model_checkpoint(ref: str, tracker, download_dir: Path) -> dict[str, Any]:
    """Read a ``fedmed fit`` model checkpoint from a path or from ``runs:/<run_id>`` in the tracking
    store, with ``torch.load(weights_only=True)``: a file from elsewhere cannot run code here, and its
    config (``ckpt["config"]``, a DictConfig) names only fedmed's own classes (:func:`checked_config`)."""
    if ref.startswith("runs:/"):
        run_id = ref.removeprefix("runs:/").strip("/").split("/")[0]
        try:
            ref = tracker.client.download_artifacts(run_id, "checkpoint/model.pt", str(download_dir))
        except Exception as exc:  # noqa: BLE001 - unknown run, missing artifact, unreachable store
            raise FedmedError(f"checkpoint={ref!r}: no checkpoint/model.pt in that run ({exc})") from None
    path = Path(ref).expanduser()
    if not path.exists():
        raise FedmedError(f"checkpoint {path} does not exist (give checkpoint=<model.pt> or checkpoint=runs:/<run_id>)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FedmedError(f"checkpoint {path} is not a fedmed checkpoint that can be read safely: "
                          f"{unsafe_reason(exc)}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= set(ckpt):
        raise FedmedError(f"checkpoint {path} is not a fedmed checkpoint (needs 'state_dict' and 'config')")
    ckpt["config"] = checked_config(ckpt["config"], f"checkpoint {path}")
    return ckpt


def checkpoint_net(ckpt: dict[str, Any], ref: str) -> torch.nn.Module:
    """The network a checkpoint (from :func:`load_model_checkpoint`) holds, its weights loaded; a file whose
    weights do not fit the network its config names is refused in one line."""
    net, _ = build_net(ckpt["config"])  # DP-trained models carry GroupNorm where the config says BatchNorm
    try:
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise FedmedError(f"checkpoint {ref}: its weights do not fit the network its config names "
                          f"(model.net._target_={ckpt['config'].model.net.get('_target_')}): {first}") from None
    return net
