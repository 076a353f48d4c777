"""The run's privacy record: one page a data-protection officer can read (logged to MLflow, printed)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any


def privacy_record(
    *,
    mode: str,
    sites: Sequence[str],
    rounds_done: int,
    bytes_up: Sequence[int],
    bytes_down: Sequence[int],
    compression: str,
    secure_aggregation: bool,
    dp: Mapping[str, Mapping[str, float]] | None,
    dp_setting: str,
    audit: Sequence[Mapping[str, Any]],
    num_train: int,
    class_statistics: Collection[str] = (),
    features_from_round: int | None = None,
) -> dict[str, Any]:
    """Everything the run shared and what an attacker could learn from the model.

    Args:
        bytes_up: model-update bytes the sites sent, per round (all sites together).
        dp: per site, its accountant's record (epsilon, delta, noise multiplier...), or None (no DP).
        audit: the membership-inference attacks' results (``name``, ``auc``, TPRs, counts).
        num_train: training images over all sites (none of them left its site in a federation).
        class_statistics: what each site sent beyond its updates (``label_counts``, ``class_features``:
            :mod:`fedmed.federated.statistics`; ``style_spectrum``: :mod:`fedmed.data.style`), in the clear.
        features_from_round: the feature moments went out every round from this one on
            (``federation.calibrate_from``), not once after the last round.
    """
    shared_images = num_train if mode == "centralized" else 0
    return {
        "mode": mode,
        "sites": list(sites),
        "rounds": rounds_done,
        "raw_images_shared": shared_images,
        "update_bytes_sent": int(sum(bytes_up)),
        "update_bytes_per_site_round": (int(sum(bytes_up) / max(rounds_done * len(sites), 1)) if mode == "federated"
                                        else 0),
        "model_bytes_received": int(sum(bytes_down)),
        "compression": compression,
        "secure_aggregation": bool(secure_aggregation),
        "class_statistics_shared": sorted(class_statistics) if mode == "federated" else [],
        "class_features_from_round": (features_from_round if mode == "federated" and "class_features" in
                                      class_statistics else None),
        "differential_privacy": dp_setting,
        "dp_per_site": {s: dict(v) for s, v in (dp or {}).items()},
        # every site is named: one that trained without reporting DP-SGD accounting is not covered by it
        "dp_unreported": [s for s in sites if s not in (dp or {})] if dp_setting != "off" and mode != "centralized"
        else [],
        "membership_inference": [dict(a) for a in audit],
        # the "privacy score" of the seed literature: only the share of data not pooled, never enough alone
        "privacy_score_P": 1.0 - shared_images / max(num_train, 1),
    }


def format_record(rec: Mapping[str, Any]) -> str:
    """The record as plain text lines."""
    lines = ["privacy record",
             f"  raw images shared:        {rec['raw_images_shared']}"
             + ("  (centralized: the pooled training data)" if rec["mode"] == "centralized" else ""),
             f"  model update bytes sent:  {rec['update_bytes_sent']:,} in total, "
             f"{rec['update_bytes_per_site_round']:,} per site per round (compression: {rec['compression']})",
             f"  secure aggregation:       {'on (the server saw only sums)' if rec['secure_aggregation'] else 'off'}",
             f"  differential privacy:     {rec['differential_privacy']}"]
    for site, d in rec["dp_per_site"].items():
        releases = int(d.get("statistics_releases", 0))
        lines.append(f"    {site}: epsilon={d['epsilon']:.3f} at delta={d['delta']:g} "
                     f"(noise multiplier {d['noise_multiplier']:.3f}, {d['dp_steps']} private steps"
                     + (f", {releases} noised release(s) of class statistics" if releases else "") + ")")
    for site in rec.get("dp_unreported", []):
        lines.append(f"    {site}: NO DP-SGD accounting reported: its updates are not covered by the setting above")
    shared = rec.get("class_statistics_shared") or []
    if shared:
        every = rec.get("class_features_from_round")
        what = {"label_counts": "training images per class", "class_features": "per-class mean and covariance of the "
                "model's penultimate features (head calibration, "
                + (f"every round from round {every})" if every is not None else "once, after the last round)"),
                "style_spectrum": "mean low-frequency amplitude spectrum of the training images (style sharing, "
                "relayed to every other site)"}
        lines.append("  statistics sent:          " + "; ".join(what.get(s, s) for s in shared)
                     + (" (masked: the server saw only the federation's sum" if rec["secure_aggregation"]
                        else " (each site's, in the clear") + ("; noised under DP-SGD)" if rec["dp_per_site"] else ")"))
    for a in rec["membership_inference"]:
        lines.append(f"  membership inference ({a['name']}, {a['members']} members vs {a['non_members']} held out): "
                     f"AUC {a['auc']:.3f}, TPR@1%FPR {a['tpr_at_1pct']:.3f}, TPR@0.1%FPR {a['tpr_at_01pct']:.3f}")
    if not rec["membership_inference"]:
        lines.append("  membership inference:     not audited (privacy.audit=none)")
    lines.append(f"  P = 1 - |D_shared|/|D_total| = {rec['privacy_score_P']:.2f} (says nothing about what the "
                 "model leaks: read the lines above)")
    return "\n".join(lines)
