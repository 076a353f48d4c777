"""``fedmed <verb> [key=value ...]``: pick the verb, compose its Hydra config, run its task."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from fedmed import __version__
from fedmed.errors import FedmedError, Terminated, stop_request
from fedmed.logs import setup_logging

VERBS = {
    "fit": "train a federation (default), one site alone (site=<name>), or centrally (mode=centralized)",
    "serve": "run a federation's server: a Flower SuperLink and fedmed's App; sites join with fedmed fit site=<name>",
    "evaluate": "score a trained model with 95% intervals and calibration: a data set, one site, or every site",
    "explain": "heatmaps and faithfulness numbers for a trained model (checkpoint=runs:/<run_id> or a path)",
    "data check": "decode every sample of a dataset and check the site manifests; lists every problem",
    "audit privacy": "membership-inference attacks on a trained model's training data (checkpoint=runs:/<run_id>)",
}
SUBCOMMANDS = {"data": ["check"], "audit": ["privacy"]}

USAGE = """usage: fedmed <verb> [--help] [--cfg] [key=value | group=option ...]

Federated, explainable medical-image classification.

verbs:
{verbs}

Overrides are Hydra-style: `group=option` picks a config file (data=breastmnist),
`a.b=value` sets a key (federation.rounds=5). `fedmed <verb> --help` lists the groups
and their options; `fedmed <verb> --cfg` prints the composed config.
"""


EXAMPLES = {
    "fit": [
        "  fedmed fit                                  # 3-site Dirichlet(0.5) FedAvg on PneumoniaMNIST",
        "  fedmed fit site=hospital_a                  # that site alone (local baseline)",
        "  fedmed fit mode=centralized                 # pooled training data (centralized baseline)",
        "  fedmed fit model=densenet federation.rounds=5 partition.alpha=0.1",
        "  fedmed fit experiment=smoke                 # 2 sites, 1 round, a few batches",
        "  fedmed fit data=brain_mri                   # 4-class brain tumour MRI from an image folder",
        "  fedmed fit data=ham10000                    # skin lesions; sites = the 4 acquisition sources",
        "  fedmed fit strategy=fedprox strategy.mu=0.01 partition.alpha=0.1",
        "  fedmed fit strategy=fednova partition=quantity # sites with very different amounts of data",
        "  fedmed fit resume=<run_id>                  # continue a killed federation from its last round",
        "  fedmed fit privacy.epsilon=8                # DP-SGD at every site, epsilon 8 over the whole run",
        "  fedmed fit privacy.secure_aggregation=true  # the server sees only the sum of the updates",
        "  fedmed fit federation.compression=int8      # 4x smaller updates (fp16 | int8 | topk)",
    ],
    "serve": [
        "  fedmed serve federation.server=0.0.0.0:9092 federation.tls.ca_cert=ca.pem \\",
        "      federation.tls.server_cert=server.pem federation.tls.server_key=server.key \\",
        "      'federation.auth.supernode_keys={hospital_a: a.pub, hospital_b: b.pub}'   # then, at each hospital:",
        "  fedmed fit site=hospital_a federation.server=fed.example.org:9092 federation.tls.ca_cert=ca.pem \\",
        "      federation.auth.private_key=hospital_a",
    ],
    "evaluate": [
        "  fedmed evaluate checkpoint=runs:/<run_id>   # its test split: 95% bootstrap intervals, calibration",
        "  fedmed evaluate checkpoint=runs:/<run_id> data=ham10000 site=vienna_dias split=all  # never trained",
        "  fedmed evaluate checkpoint=runs:/<run_id> data=ham10000 sites=all   # each site its own test images; pooled",
        "  fedmed evaluate checkpoint=path/to/model.pt n_boot=2000 seed=1",
    ],
    "explain": [
        "  fedmed explain checkpoint=runs:/<run_id>    # Grad-CAM on 32 test images, per-class views, faithfulness",
        "  fedmed explain checkpoint=runs:/<run_id> method=all n=64",
        "  fedmed explain checkpoint=path/to/model.pt split=val method=integratedgradients target=true",
        "methods: gradcam gradcam++ hirescam xgradcam layercam eigencam scorecam saliency inputxgradient",
        "         integratedgradients gradientshap",
    ],
    "data check": [
        "  fedmed data check data=brain_mri           # every image decodes, has the right shape and label",
        "  fedmed data check data=ham10000 splits=[test]",
        "  fedmed data check data=pneumoniamnist partition.alpha=0.1   # also that partition's site manifests",
    ],
    "audit privacy": [
        "  fedmed audit privacy checkpoint=runs:/<run_id>                 # loss + LiRA (8 shadow models)",
        "  fedmed audit privacy checkpoint=runs:/<run_id> privacy.audit=loss privacy.audit_n=1000",
    ],
}


def _verbs_text() -> str:
    return "\n".join(f"  {v:<14} {d}" for v, d in VERBS.items())


def config_name(verb: str) -> str:
    """The primary config of a verb: ``fit`` -> fit.yaml, ``data check`` -> data_check.yaml."""
    return verb.replace(" ", "_")


def _verb_help(verb: str) -> str:
    from fedmed.config import config_dir, groups

    lines = [f"usage: fedmed {verb} [key=value | group=option ...]", "", f"{VERBS[verb]}", "",
             f"config groups (in {config_dir()}):"]
    for group, options in groups(config_name(verb)).items():
        lines.append(f"  {group:<12} {' | '.join(options)}")
    lines += ["", "examples:", *EXAMPLES[verb], ""]
    lines += [
        "options:",
        "  --cfg      print the composed config and exit",
        "  --help     this help",
    ]
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():  # a scheduler's stop: KILLED runs, exit 143
        signal.signal(signal.SIGTERM, _terminate)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs=_verbs_text()))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fedmed {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in SUBCOMMANDS:
        if not rest or rest[0] not in SUBCOMMANDS[verb]:
            print(f"fedmed {verb}: expected one of {SUBCOMMANDS[verb]}, e.g. `fedmed {verb} "
                  f"{SUBCOMMANDS[verb][0]} --help`", file=sys.stderr)
            return 2
        verb, rest = f"{verb} {rest[0]}", rest[1:]
    if verb not in VERBS:
        print(f"fedmed: unknown verb {verb!r}; verbs: {', '.join(VERBS)}. See `fedmed --help`.", file=sys.stderr)
        return 2
    try:
        if "-h" in rest or "--help" in rest:
            print(_verb_help(verb))
            return 0
        from omegaconf import OmegaConf

        from fedmed.config import compose

        show_cfg = "--cfg" in rest
        overrides = [a for a in rest if a != "--cfg"]
        bad = [a for a in overrides if a.startswith("-") or "=" not in a]
        if bad:
            raise FedmedError(f"expected key=value overrides, got {bad}. See `fedmed {verb} --help`.")
        cfg = compose(config_name(verb), overrides)
        from fedmed.schema import validate

        validate(cfg, config_name(verb), strategy=not show_cfg)  # --cfg shows the config without importing torch
        if verb in ("fit", "serve") and [o.split("=", 1)[0] for o in overrides] == ["resume"]:
            from fedmed.build import stored_config  # resume=<id> alone: the federation's own config

            cfg = stored_config(cfg)
            validate(cfg, config_name(verb))
        if show_cfg:
            print(OmegaConf.to_yaml(cfg))
            return 0
        setup_logging()
        import importlib

        from fedmed.tasks import TASKS

        importlib.import_module(f"fedmed.tasks.{TASKS[config_name(verb)]}").run(cfg)
        return 0
    except FedmedError as exc:
        print(f"fedmed {verb}: error: {exc}", file=sys.stderr)
        _resume_hint(verb, exc)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns an interrupt during fit into SystemExit(1)
        stop = stop_request(exc)
        if stop is None:
            raise
        if isinstance(stop, Terminated):
            print(f"fedmed {verb}: terminated (SIGTERM); its MLflow runs are marked KILLED", file=sys.stderr)
            _resume_hint(verb, exc)
            return 143
        print(f"fedmed {verb}: interrupted; its MLflow runs are marked KILLED", file=sys.stderr)
        _resume_hint(verb, exc)
        return 130


def _resume_hint(verb: str, exc: BaseException) -> None:
    """The command that continues a federation that stopped, where it has one."""
    command = getattr(exc, "fedmed_resume", None) or getattr(exc.__context__, "fedmed_resume", None)
    if command:
        print(f"fedmed {verb}: continue it from its last round with: {command}", file=sys.stderr)


def entry() -> None:
    """The ``fedmed`` command: :func:`main`, and an exit that a site call still running past its
    ``federation.site_timeout`` cannot turn into an abort (its torch code would be torn down mid-step)."""
    try:
        code = main()
    except BrokenPipeError:  # `fedmed --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    calls = sys.modules.get("fedmed.federated.calls")  # imported only where sites were called
    if calls is not None and calls.timed_out_calls():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
