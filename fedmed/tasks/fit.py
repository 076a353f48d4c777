"""``fedmed fit``: federated training, or a local / centralized baseline on the same splits.

Wiring only: builds sources, sites, clients, the orchestrator and the MLflow runs from the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedmed.config import site_config
from fedmed.data.datamodule import Pipeline, SiteData, make_loader
from fedmed.data.manifest import read_manifest
from fedmed.data.sites import describe_partition, ensure_manifests, site_class_counts
from fedmed.errors import FedmedError
from fedmed.federated import InProcessSite, Orchestrator, SiteClient, make_strategy
from fedmed.federated.compression import UpdateEncoder
from fedmed.federated.server import CHECKPOINT, load_checkpoint
from fedmed.models.classifier import LR_SCHEDULES, OPTIMIZERS, Classifier
from fedmed.models.metrics import evaluate
from fedmed.privacy.dp import DPConfig, describe, dp_compatible
from fedmed.privacy.record import format_record, privacy_record
from fedmed.tasks.audit import AUDITS, attack_rows, audit_model, mlflow_attack_metrics
from fedmed.reporting import confusion_figure, fmt_bytes, partition_figure, summary_table
from fedmed.tracking import Tracker

log = logging.getLogger("fedmed")

MODES = ("federated", "centralized", "local")
def dp_config(cfg: DictConfig) -> DPConfig | None:
    """The run's DP-SGD settings (``privacy.*``), or None when DP is off."""
    p = cfg.get("privacy")
    return DPConfig.from_config(OmegaConf.to_container(p, resolve=True)) if p is not None else None


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
    opt = cfg.model.optimizer
    name, schedule = opt.get("name", "adam"), opt.get("schedule", "constant")
    for key, value, allowed in (("name", name, OPTIMIZERS), ("schedule", schedule, LR_SCHEDULES)):
        if value not in allowed:  # the Classifier checks too, but cannot name the config key
            raise FedmedError(f"model.optimizer.{key}={value!r} is not one of {', '.join(allowed)}")
    return Classifier(net, cfg.data.num_classes, lr=opt.lr, weight_decay=opt.weight_decay,
                      logit_adjust=cfg.model.get("logit_adjust", 0.0), lr_schedule=schedule,
                      min_lr_ratio=opt.get("min_lr_ratio", 0.05), optimizer=name, momentum=opt.get("momentum", 0.9),
                      keep_state=opt.get("keep_state", False))


#: strategies whose site-side part Opacus' DP-SGD cannot carry
DP_INCOMPATIBLE = {
    "fedprox": "its proximal term's gradient is added outside the per-sample gradients DP-SGD clips",
    "fedbn": "DP replaces BatchNorm with GroupNorm, so there are no BatchNorm layers to keep local",
    "scaffold": "its gradient correction is added outside the per-sample gradients DP-SGD clips",
}


def check_settings(cfg: DictConfig, mode: str) -> None:
    """Refuse combinations that would not do what they say (strategy vs model, DP, secure aggregation), before
    anything runs."""
    strategy = cfg.federation.strategy
    if strategy == "fedbn" and mode == "federated" and cfg.model.net.get("norm", "batch") != "batch":
        raise FedmedError(f"federation.strategy=fedbn with model.net.norm={cfg.model.net.norm}: FedBN keeps each "
                          "site's BatchNorm layers local, and this model has none. Use model.net.norm=batch, "
                          "or another strategy.")
    if dp_config(cfg) is not None and mode == "federated" and strategy in DP_INCOMPATIBLE:
        raise FedmedError(f"privacy.epsilon/noise_multiplier (DP-SGD) with federation.strategy={strategy}: "
                          f"{DP_INCOMPATIBLE[strategy]}. Use fedavg, fedadam, fedyogi or a robust aggregator.")
    if cfg.privacy.secure_aggregation and cfg.federation.compression != "none":
        raise FedmedError("privacy.secure_aggregation with federation.compression: a masked update is dense "
                          "64-bit fixed point, so compression would buy nothing; choose one")
    if cfg.privacy.secure_aggregation and mode != "federated":
        raise FedmedError("privacy.secure_aggregation applies to federations, not to local or centralized runs")
    if cfg.privacy.audit not in AUDITS:
        raise FedmedError(f"privacy.audit={cfg.privacy.audit!r} is not one of {AUDITS}")


def build_strategy(cfg: DictConfig, num_sites: int | None = None):
    """The ``federation.strategy`` with its parameters from ``federation``."""
    f = cfg.federation
    name = f.strategy
    params = {"bn_stats": f.bn_stats, "mu": f.mu, "trim_beta": f.trim_beta, "krum_f": f.krum_f, "krum_m": f.krum_m}
    if name == "krum":
        params["num_sites"] = num_sites or len(f.sites)
    if name in ("fedadam", "fedyogi"):
        params.update(server_lr=f.server_lr, beta1=f.beta1, beta2=f.beta2, tau=f.tau)
    if name == "scaffold":
        params.update(server_lr=f.scaffold_server_lr, local_lr=f.scaffold_local_lr,
                      num_sites=num_sites or len(f.sites))
    return make_strategy(name, **params)


def resolve_mode(cfg: DictConfig) -> str:
    mode = "local" if cfg.get("site") else cfg.mode
    if mode not in MODES:
        raise FedmedError(f"mode={mode!r} is not one of {MODES}")
    if mode == "local" and not cfg.get("site"):
        raise FedmedError("mode=local needs a site: fedmed fit site=<name>")
    return mode


def _site_data(cfg: DictConfig, manifest, site_cfg: DictConfig) -> SiteData:
    """A site's data: its manifest, read against the site's own copy of the source."""
    return Pipeline.from_config(cfg.data, instantiate(cfg.data.source, root=site_cfg.data_root)).site(manifest)


def write_partition(cfg: DictConfig, source) -> None:
    """Write the federation's site manifests unless they exist (they are never overwritten)."""
    p = cfg.partition
    ensure_manifests(source, list(cfg.federation.sites), [site_config(cfg, s).manifest for s in cfg.federation.sites],
                     p.method, p.alpha, cfg.seed, p.min_samples, p.get("column"),
                     OmegaConf.to_container(p.groups) if p.get("groups") else None)


def attackers(cfg: DictConfig) -> dict[str, str]:
    """``federation.attackers=[hospital_d:signflip]`` -> {"hospital_d": "signflip"}."""
    out = {}
    for item in cfg.federation.get("attackers") or []:
        site, sep, kind = str(item).partition(":")
        if not sep or site not in cfg.federation.sites:
            raise FedmedError(f"federation.attackers entry {item!r} must be <site>:<attack> with a site of "
                              f"federation.sites {list(cfg.federation.sites)}")
        out[site] = kind
    return out


def _site_client(cfg: DictConfig, name: str, index: int, data: SiteData, tracker, run_id: str | None,
                 class_names: list[str] | None = None, federated: bool | None = None) -> SiteClient:
    """The SiteClient of ``name``; ``federated`` (default: the run's mode) turns on compression and plans DP."""
    federated = resolve_mode(cfg) == "federated" if federated is None else federated
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    attack = attackers(cfg).get(name)
    if attack:
        log.warning("site %s is a test attacker: %s (x%s)", name, attack, cfg.federation.attack_scale)
    fed = cfg.federation
    planned = fed.rounds * fed.local_epochs + (fed.finetune_epochs if federated else 0)
    encoder = (UpdateEncoder(fed.compression, fed.topk_fraction, fed.error_feedback)
               if fed.compression != "none" and federated else None)
    return SiteClient(name, data, lambda: build_module(cfg), cfg.data.batch_size, trainer_kwargs, cfg.seed, index,
                      tracker, run_id, explain={"method": cfg.explain.method, "n": cfg.explain.n},
                      class_names=class_names, attack=attack, attack_scale=float(fed.attack_scale),
                      privacy=dp_config(cfg), planned_epochs=planned, encoder=encoder)


def explain_rounds(rounds: int, every: int) -> set[int]:
    """Rounds whose global model the sites explain: every ``every``-th and the last (none if ``every`` is 0)."""
    return {r for r in range(1, rounds + 1) if r % every == 0} | {rounds} if every > 0 else set()


def _federate(cfg: DictConfig, clients: list[SiteClient], initial, tracker, run_id: str, checkpoint_dir,
              resume: dict | None, extra_state: dict):
    """Run the orchestrator; return (result, selection text, per-site rows, communication text)."""
    fed = cfg.federation
    orchestrator = Orchestrator(
        [InProcessSite(c) for c in clients], build_strategy(cfg, len(clients)), fed.rounds, fed.local_epochs,
        fed.fraction, fed.min_sites, cfg.seed, fed.select, tracker, run_id,
        explain_rounds(fed.rounds, cfg.explain.every_n_rounds), fed.site_timeout, checkpoint_dir, extra_state,
        secure_aggregation=bool(cfg.privacy.secure_aggregation),
    )
    result = orchestrator.run(initial, resume)
    rows = [("global model", s, "val", e) for s, e in result.site_eval.items()]
    if fed.finetune_epochs > 0:  # personalisation: each site fine-tunes the selected model on its own data
        config = orchestrator.strategy.site_config(result.weights)
        for c in clients:
            tuned = c.train(result.weights, fed.rounds + 1, fed.finetune_epochs, config, send=False).weights
            ev = c.evaluate(tuned, fed.rounds + 1, log_metrics=False)
            tracker.log_metrics(c.run_id, {f"personalized_val_{k}": v for k, v in ev.metrics.items()}, step=fed.rounds)
            rows.append((f"fine-tuned {fed.finetune_epochs} ep", c.name, "val", ev))
    last = result.history[-1]
    codec = "" if fed.compression == "none" else f", {fed.compression} updates"
    comm = (f"bytes sent per round: {fmt_bytes(last.bytes_down)} down + {fmt_bytes(last.bytes_up)} up "
            f"({len(last.sites)} sites{codec}; model {fmt_bytes(last.bytes_down / max(len(last.sites), 1))} raw); "
            "raw images sent: 0")
    return result, f"round {result.round}/{fed.rounds}", rows, comm


def find_checkpoint(cfg: DictConfig) -> Path:
    """``resume=<dir or run id>`` -> the server checkpoint file."""
    given = Path(str(cfg.resume)).expanduser()
    for path in (given / CHECKPOINT, given, Path(cfg.federation.checkpoint_dir) / str(cfg.resume) / CHECKPOINT):
        if path.is_file():
            return path
    raise FedmedError(f"resume={cfg.resume}: no {CHECKPOINT} there or in {cfg.federation.checkpoint_dir}/{cfg.resume}/")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def dp_records_from_history(history) -> dict[str, dict[str, float]]:
    """Each site's last DP report (its fit metrics ``dp_*``): what a server learns from remote sites too."""
    out: dict[str, dict[str, float]] = {}
    for h in history:
        for site, m in h.site_metrics.items():
            if "dp_epsilon" in m:
                out[site] = {"epsilon": m["dp_epsilon"], "delta": m["dp_delta"],
                             "noise_multiplier": m["dp_noise_multiplier"], "dp_steps": int(m["dp_steps"])}
    return out


def finish(cfg: DictConfig, mode: str, sites: list[str], pipeline: Pipeline, weights, chosen: str, seconds: float,
           site_rows: list, comm: str, tracker: Tracker, run_id: str, trained_on: list, dp_records: dict,
           history: list, num_train: int | None = None, epochs: int | None = None
           ) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the chosen model on the test split, audit it, log the model and the privacy record, print the summary.

    ``epochs``: the training epochs behind the chosen model (LiRA trains its shadow models as long).

    Returns:
        (test metrics, privacy record).
    """
    source = pipeline.source
    dp = dp_config(cfg)
    # -- final evaluation on the official test split ---------------------------------
    module = build_module(cfg)
    module.net.load_state_dict(weights)
    test = pipeline.dataset("test")
    test_metrics, confmat = evaluate(module.net, make_loader(test, 256, False), cfg.data.num_classes)
    tracker.log_metrics(run_id, {f"test_{k}": v for k, v in test_metrics.items()}, step=cfg.federation.rounds)
    tracker.log_metrics(run_id, {"fit_seconds": seconds}, step=0)
    title = f"{cfg.data.name} test, {mode} {cfg.model.name} ({chosen})"
    tracker.log_figure(run_id, confusion_figure(confmat, source.class_names, title), "confusion_matrix_test.png")
    tracker.log_state_dict(run_id, {"state_dict": weights, "config": OmegaConf.to_container(cfg, resolve=True),
                                    "class_names": source.class_names, "run_id": run_id, "epochs": epochs},
                           "checkpoint/model.pt")
    if cfg.logger.log_model:
        tracker.log_model(run_id, module.net.cpu().eval(), test.x[:2].numpy(), "model")

    # -- privacy: membership-inference audit of the final model, and the run's record ----
    attacks = audit_model(cfg, module.net, trained_on, [pipeline.dataset("val")], epochs=epochs)
    record = privacy_record(
        mode=mode, sites=sites, rounds_done=len(history), bytes_up=[h.bytes_up for h in history],
        bytes_down=[h.bytes_down for h in history], compression=cfg.federation.compression if history else "none",
        secure_aggregation=bool(cfg.privacy.secure_aggregation), dp=dp_records, dp_setting=describe(dp),
        audit=attack_rows(attacks), num_train=num_train if num_train is not None else sum(len(d) for d in trained_on))
    tracker.log_dict(run_id, record, "privacy/record.json")
    tracker.log_metrics(run_id, {**mlflow_attack_metrics(attacks), "privacy_update_bytes_sent": record["update_bytes_sent"],
                                 **({"dp_epsilon_max": max(d["epsilon"] for d in dp_records.values())}
                                    if dp_records else {})}, step=cfg.federation.rounds)

    rows = [{"who": f"{label} @ {site}", "split": split, "n": e.num_samples, **e.metrics}
            for label, site, split, e in site_rows]
    rows.append({"who": f"{mode} model", "split": "test", "n": int(confmat.sum()), **test_metrics})
    text = summary_table(
        f"fedmed fit: {mode}, {cfg.data.name}, {cfg.model.name}, selected {chosen}, {seconds:.0f}s",
        rows,
        f"{comm}\n{format_record(record)}\n"
        f"MLflow run {run_id}; browse it with: mlflow ui --backend-store-uri {cfg.logger.tracking_uri}",
    )
    tracker.log_text(run_id, text, "summary.txt")
    return test_metrics, record


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fedmed fit``; returns the test metrics, per-site metrics and the MLflow run id."""
    if cfg.get("site") and cfg.federation.get("server"):  # one hospital joining a federation over the network
        from fedmed.tasks.serve import run_site

        return run_site(cfg)
    mode = resolve_mode(cfg)
    if mode == "federated" and cfg.federation.get("parallel") and not cfg.get("resume"):
        from fedmed.tasks.serve import run_parallel

        return run_parallel(cfg)
    check_settings(cfg, mode)
    dp = dp_config(cfg)
    if dp is not None:
        _, changes = build_net(cfg)
        log.warning("DP-SGD on (%s); the model is made DP-compatible: %s", describe(dp),
                    "; ".join(changes) or "no change needed")
    pipeline = Pipeline.from_config(cfg.data)
    source = pipeline.source
    source.ensure_available()
    sites = [cfg.site.name] if mode == "local" else list(cfg.federation.sites)
    site_cfgs = {s: site_config(cfg, s) for s in sites}
    manifests = {}
    if mode != "centralized":
        write_partition(cfg, source)
        manifests = {s: read_manifest(site_cfgs[s].manifest) for s in sites}
        log.info(describe_partition(list(manifests.values())))
    epochs = cfg.federation.rounds * cfg.federation.local_epochs

    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment, cfg.logger.artifact_location)
    resume, config = None, OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("resume"):
        if mode != "federated":
            raise FedmedError("resume= continues a federation; local and centralized runs start over")
        path = find_checkpoint(cfg)
        resume = load_checkpoint(path)
        diff = _config_diff({k: v for k, v in resume["config"].items() if k != "resume"},
                            {k: v for k, v in config.items() if k != "resume"})
        if diff:
            raise FedmedError(f"resume={cfg.resume}: this run's config differs from the one in {path}: "
                              + "; ".join(diff[:5]))
        log.info("resuming MLflow run %s from %s (round %d done)", resume["run_id"], path, resume["round"])
    name = cfg.run_name or f"{mode}-{cfg.data.name}-{cfg.model.name}" + (f"-{sites[0]}" if mode == "local" else "")
    tags = {"dataset": cfg.data.name, "model": cfg.model.name, "mode": mode,
            "strategy": cfg.federation.strategy if mode == "federated" else "none",
            "partition": cfg.partition.dirname if mode != "centralized" else "pooled"}
    if mode == "local":
        tags["site"] = sites[0]
    tags.update({"privacy.dp": describe(dp), "privacy.secure_aggregation": str(bool(cfg.privacy.secure_aggregation)),
                 "federation.compression": cfg.federation.compression if mode == "federated" else "none"})
    if resume:
        run_id = resume["run_id"]
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(name, tags)
        tracker.log_params(run_id, config)
        tracker.log_text(run_id, OmegaConf.to_yaml(cfg), "config.yaml")
    checkpoint_dir = Path(cfg.federation.checkpoint_dir) / run_id
    if mode == "federated":
        tracker.set_tags(run_id, {"checkpoint_dir": str(checkpoint_dir)})
    if manifests and not resume:
        counts = site_class_counts(list(manifests.values()))
        tracker.log_dict(run_id, {s: row.tolist() for s, row in zip(manifests, counts)}, "partition/class_counts.json")
        tracker.log_text(run_id, describe_partition(list(manifests.values())), "partition/summary.txt")
        tracker.log_table(run_id, {"site": list(manifests), **{c: counts[:, j].tolist() for j, c in
                                                               enumerate(source.class_names)}},
                          "partition/class_counts_table.json")
        tracker.log_figure(run_id, partition_figure(counts, source.class_names, list(manifests),
                                                    f"{cfg.data.name}: {cfg.partition.dirname}"), "partition/class_counts.png")
    clients: list[SiteClient] = []
    try:
        L.seed_everything(cfg.seed, verbose=False)
        initial = build_module(cfg).net.state_dict()
        t0 = time.perf_counter()
        if mode == "federated":
            site_runs = dict(resume["site_runs"]) if resume else {}
            for k, s in enumerate(sites):
                if s in site_runs:
                    tracker.reopen(site_runs[s])
                else:
                    site_runs[s] = tracker.start_run(s, {"site": s, "dataset": cfg.data.name, "role": "site"},
                                                     parent_id=run_id)
                clients.append(_site_client(cfg, s, k, _site_data(cfg, manifests[s], site_cfgs[s]), tracker,
                                            site_runs[s], source.class_names))
                if not resume:
                    tracker.log_params(site_runs[s], {**clients[-1].initialize(), "manifest": site_cfgs[s].manifest})
            extra = {"run_id": run_id, "site_runs": site_runs, "config": config}
            result, chosen, site_rows, comm = _federate(cfg, clients, initial, tracker, run_id, checkpoint_dir,
                                                        resume, extra)
            weights = result.weights
            trained_on = [c.data.train for c in clients]
            history = result.history
            dp_records = dp_records_from_history(history)
            trained_epochs = result.round * cfg.federation.local_epochs
        else:
            if mode == "local":
                who, data = sites[0], _site_data(cfg, manifests[sites[0]], site_cfgs[sites[0]])
            else:
                who, data = "pooled", pipeline.pooled()
            client = _site_client(cfg, who, 0, data, tracker, run_id)
            weights, best_epoch = client.train_alone(epochs, "last" if cfg.federation.select == "last" else "best_val_loss")
            chosen = f"epoch {best_epoch}/{epochs}"
            tracker.set_tags(run_id, {"selected_epoch": best_epoch})
            site_rows = [(f"{mode} model", who, "val", client.evaluate(weights, epochs, log_metrics=False))]
            comm = "bytes sent: 0 (no federation)"
            trained_on = [data.train]
            dp_records = {who: client.dp.record()} if client.dp is not None else {}
            history = []
            trained_epochs = best_epoch
        seconds = time.perf_counter() - t0

        test_metrics, record = finish(cfg, mode, sites, pipeline, weights, chosen, seconds, site_rows, comm,
                                      tracker, run_id, trained_on, dp_records, history, epochs=trained_epochs)
        for c in clients:
            c.finalize("FINISHED")
        tracker.end_run(run_id, "FINISHED")
    except BaseException as exc:  # the runs keep what was logged so far, marked as not finished
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for c in clients:
            c.finalize(status)
        tracker.end_run(run_id, status)
        raise
    return {
        "mode": mode,
        "run_id": run_id,
        "test": test_metrics,
        "sites": {site: {**e.metrics, "n": e.num_samples} for _, site, _, e in site_rows},
        "selected": chosen,
        "seconds": seconds,
        "privacy": record,
    }
