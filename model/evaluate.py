"""Evaluation: the fixed hold-out protocol, deployed model vs prototype, as JSON, plots, report."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import train_test_split

from factorywatch.model.dataset import FAILURE_MODES, LABEL, Dataset
from factorywatch.model.features import (
    DEFAULT_FEATURE_SET,
    FEATURE_SETS,
    HEADROOM_CAP,
    compute_features,
)
from factorywatch.model.scoring import SklearnScorer
from factorywatch.model.threshold import ThresholdSpec
from factorywatch.model.train import DEFAULT_MAX_FEATURES, DEFAULT_MAX_SAMPLES, DEFAULT_TREES, fit

matplotlib.use("Agg")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

TEST_SIZE: Final = 0.3
SPLIT_SEED: Final = 0
BASELINE_FEATURE_SET: Final = "prototype"
# The prototype as it was built: sklearn's defaults of 256 samples per tree, 200 trees.
PROTOTYPE_TREES: Final = 200
PROTOTYPE_MAX_SAMPLES: Final = "auto"
JSON_FILE: Final = "evaluation.json"
REPORT_FILE: Final = "evaluation.md"
SCORES_PNG: Final = "score_distributions.png"
ROC_PNG: Final = "roc_curve.png"
PR_PNG: Final = "pr_curve.png"
STEPS_PNG: Final = "steps.png"
PLOTS: Final = (SCORES_PNG, ROC_PNG, PR_PNG, STEPS_PNG)


@dataclass(frozen=True)
class Step:
    """One rung of the ladder from the prototype to the deployed model."""

    name: str
    feature_set: str
    n_estimators: int
    max_samples: int | str
    why: str


@dataclass(frozen=True)
class Scored:
    """A model fitted on the training rows and scored on the hold-out rows."""

    features: list[str]
    params: dict[str, Any]
    test_scores: FloatArray
    threshold: float
    train_alert_rate: float
    test_outside: npt.NDArray[np.bool_]  # hold-out rows outside the training envelope


def _no_progress(_: str) -> None:
    return None


def split(labels: npt.NDArray[np.int_]) -> tuple[IntArray, IntArray]:
    """The protocol's stratified 70/30 split of row indices (labels only stratify)."""
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return np.asarray(train_idx, dtype=np.intp), np.asarray(test_idx, dtype=np.intp)


def _fit_and_score(
    dataset: Dataset,
    train_idx: IntArray,
    test_idx: IntArray,
    *,
    feature_set: str,
    n_estimators: int,
    max_samples: int | str,
    seed: int,
    spec: ThresholdSpec,
) -> Scored:
    """Fit on ``train_idx`` without labels, score ``test_idx`` (higher = more anomalous)."""
    forest, card = fit(
        dataset,
        feature_set=feature_set,
        n_estimators=n_estimators,
        max_samples=max_samples,
        seed=seed,
        threshold=spec,
        rows=train_idx,
    )
    columns = {name: values[test_idx] for name, values in dataset.columns().items()}
    matrix = compute_features(columns, card.features)
    outside = card.envelope.outside(columns, len(test_idx)) if card.envelope else []
    return Scored(
        features=list(card.features),
        params=dict(card.params),
        test_scores=SklearnScorer(forest).score(matrix),
        threshold=card.threshold,
        train_alert_rate=card.metrics["train_alert_rate"],
        test_outside=np.array([o is not None for o in outside], dtype=np.bool_),
    )


def _metrics(y: npt.NDArray[np.int_], scored: Scored) -> dict[str, Any]:
    """Ranking metrics plus precision/recall/F1 at the calibrated threshold."""
    flagged = scored.test_scores > scored.threshold
    return {
        "roc_auc": float(roc_auc_score(y, scored.test_scores)),
        "pr_auc": float(average_precision_score(y, scored.test_scores)),
        "precision": float(precision_score(y, flagged, zero_division=0)),
        "recall": float(recall_score(y, flagged, zero_division=0)),
        "f1": float(f1_score(y, flagged, zero_division=0)),
        "threshold": scored.threshold,
        "alert_rate": float(np.mean(flagged)),
        "train_alert_rate": scored.train_alert_rate,
        "features": scored.features,
        "params": scored.params,
    }


def _per_mode(
    dataset: Dataset, test_idx: IntArray, flagged: npt.NDArray[np.bool_]
) -> tuple[dict[str, float | None], dict[str, int]]:
    """Recall among hold-out rows flagged with each failure mode, and their counts."""
    recall: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for mode in FAILURE_MODES:
        mask = dataset.frame[mode].to_numpy()[test_idx] == 1
        counts[mode] = int(mask.sum())
        recall[mode] = float(flagged[mask].mean()) if mask.any() else None
    return recall, counts


def ladder(feature_set: str, n_estimators: int) -> list[Step]:
    """The measured steps from the prototype to the deployed configuration."""
    proto, proto_ms = PROTOTYPE_TREES, PROTOTYPE_MAX_SAMPLES
    return [
        Step("prototype", "prototype", proto, proto_ms, "air temperature + speed only"),
        Step("raw channels", "raw", proto, proto_ms, "all five sensor channels"),
        Step(
            "physics",
            "physics",
            proto,
            proto_ms,
            "temperature difference, power, strain ratio per type, tool wear",
        ),
        Step(
            "log power",
            "log_power",
            proto,
            proto_ms,
            "power folded around the centre of its window: |ln(P / 5612 W)|",
        ),
        Step(
            "boundary margins",
            "margins",
            proto,
            proto_ms,
            "relative distance to the heat-dissipation region and the power window",
        ),
        Step(
            "saturated headroom",
            "headroom",
            proto,
            proto_ms,
            f"margins capped at {HEADROOM_CAP:.0%}: very safe readings stop looking odd",
        ),
        Step(
            "deployed",
            feature_set,
            n_estimators,
            DEFAULT_MAX_SAMPLES,
            f"{n_estimators} trees, {DEFAULT_MAX_SAMPLES} samples per tree",
        ),
    ]


def _round(value: Any) -> Any:
    """Round floats (recursively) so the JSON stays readable and diffable."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def run(
    dataset: Dataset,
    out_dir: Path,
    *,
    feature_set: str = DEFAULT_FEATURE_SET,
    seed: int = 0,
    n_estimators: int = DEFAULT_TREES,
    progress: Callable[[str], None] = _no_progress,
) -> dict[str, Any]:
    """Apply the hold-out protocol; write ``evaluation.json``, plots and ``evaluation.md``.

    Labels stratify the split and score the hold-out; they never reach a forest.
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; choose from {list(FEATURE_SETS)}")
    labels = dataset.frame[LABEL].to_numpy(dtype=np.int_)
    train_idx, test_idx = split(labels)
    y = labels[test_idx]
    spec = ThresholdSpec()

    def scored(step: Step) -> Scored:
        progress(f"{step.name}: {step.feature_set}, {step.n_estimators} trees")
        return _fit_and_score(
            dataset,
            train_idx,
            test_idx,
            feature_set=step.feature_set,
            n_estimators=step.n_estimators,
            max_samples=step.max_samples,
            seed=seed,
            spec=spec,
        )

    steps = ladder(feature_set, n_estimators)
    results = {step.name: scored(step) for step in steps}
    deployed, baseline = results["deployed"], results["prototype"]
    flagged = deployed.test_scores > deployed.threshold
    per_mode, mode_counts = _per_mode(dataset, test_idx, flagged)
    report: dict[str, Any] = {
        "feature_set": feature_set,
        "features": deployed.features,
        **{k: v for k, v in _metrics(y, deployed).items() if k != "features"},
        "threshold_spec": spec.model_dump(),
        "per_mode_recall": per_mode,
        "per_mode_count": mode_counts,
        # The deployed detector also alerts outside the training envelope (model.envelope).
        "envelope_outside_test_rows": int(deployed.test_outside.sum()),
        "envelope_outside_test_failures": int(y[deployed.test_outside].sum()),
        "baseline": {"feature_set": BASELINE_FEATURE_SET, **_metrics(y, baseline)},
        "steps": [
            {
                "name": step.name,
                "feature_set": step.feature_set,
                "why": step.why,
                **_metrics(y, results[step.name]),
            }
            for step in steps
        ],
        "dataset": {
            "file": dataset.path.name,
            "sha256": dataset.sha256,
            "layout": dataset.layout,
            "rows": len(labels),
            "verified": dataset.verified,
        },
        "protocol": {
            "split": (
                "sklearn.model_selection.train_test_split(np.arange(n), test_size="
                f"{TEST_SIZE}, stratify={LABEL}, random_state={SPLIT_SEED})"
            ),
            "fit": "IsolationForest on the training rows' features only; labels never fitted",
            "threshold": (
                f"{spec.method}={spec.value}: quantile {1 - spec.value:g} of the training "
                "rows' scores"
            ),
            "evaluation": f"hold-out scores against {LABEL}",
            "train_rows": len(train_idx),
            "test_rows": len(test_idx),
            "test_failures": int(y.sum()),
            "seed": seed,
            "max_features": DEFAULT_MAX_FEATURES,
        },
        "plots": list(PLOTS),
    }
    report = _round(report)
    _write(out_dir, report, y, deployed, baseline)
    progress(f"wrote {out_dir / JSON_FILE} and {out_dir / REPORT_FILE}")
    return report


# -- output: the only side effects ----------------------------------------------------------
def _write(
    out_dir: Path, report: dict[str, Any], y: npt.NDArray[np.int_], deployed: Scored, base: Scored
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
    _plot_scores(out_dir / SCORES_PNG, y, deployed, base)
    _plot_roc(out_dir / ROC_PNG, y, deployed, base, report)
    _plot_pr(out_dir / PR_PNG, y, deployed, base, report)
    _plot_steps(out_dir / STEPS_PNG, report["steps"])
    (out_dir / REPORT_FILE).write_text(markdown(report))


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_scores(path: Path, y: npt.NDArray[np.int_], deployed: Scored, base: Scored) -> None:
    fig = Figure(figsize=(10, 4))
    for ax, (title, s) in zip(
        fig.subplots(1, 2), (("deployed", deployed), ("prototype baseline", base)), strict=True
    ):
        bins = np.linspace(float(s.test_scores.min()), float(s.test_scores.max()), 50)
        ax.hist(s.test_scores[y == 0], bins=bins, density=True, alpha=0.6, label="no failure")
        ax.hist(s.test_scores[y == 1], bins=bins, density=True, alpha=0.6, label="failure")
        ax.axvline(s.threshold, color="black", linestyle="--", label="threshold")
        ax.set_title(f"{title}: hold-out anomaly scores")
        ax.set_xlabel("anomaly score (higher = more anomalous)")
        ax.set_ylabel("density")
        ax.legend()
    _save(fig, path)


def _plot_roc(
    path: Path, y: npt.NDArray[np.int_], deployed: Scored, base: Scored, report: dict[str, Any]
) -> None:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for name, s, auc in (
        ("deployed", deployed, report["roc_auc"]),
        ("prototype", base, report["baseline"]["roc_auc"]),
    ):
        fpr, tpr, _ = roc_curve(y, s.test_scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("ROC, hold-out")
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_pr(
    path: Path, y: npt.NDArray[np.int_], deployed: Scored, base: Scored, report: dict[str, Any]
) -> None:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for name, s, ap in (
        ("deployed", deployed, report["pr_auc"]),
        ("prototype", base, report["baseline"]["pr_auc"]),
    ):
        precision, recall, _ = precision_recall_curve(y, s.test_scores)
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.axhline(float(np.mean(y)), color="grey", linestyle=":", label="failure rate")
    ax.scatter([report["recall"]], [report["precision"]], color="black", zorder=3)
    ax.annotate("deployed threshold", (report["recall"], report["precision"]))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall, hold-out")
    ax.legend(loc="upper right")
    _save(fig, path)


def _plot_steps(path: Path, steps: Sequence[dict[str, Any]]) -> None:
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    x = np.arange(len(steps))
    width = 0.27
    for offset, key in ((-width, "roc_auc"), (0.0, "pr_auc"), (width, "f1")):
        ax.bar(x + offset, [s[key] for s in steps], width, label=key)
    ax.set_xticks(x, [s["name"] for s in steps], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("From the prototype to the deployed model (hold-out)")
    ax.legend()
    _save(fig, path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return text.replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report for an ``evaluation.json`` dictionary."""
    base = report["baseline"]
    proto = report["protocol"]
    data = report["dataset"]
    params = report["params"]
    rows = [
        ("ROC-AUC", "roc_auc"),
        ("PR-AUC (average precision)", "pr_auc"),
        ("precision at threshold", "precision"),
        ("recall at threshold", "recall"),
        ("F1 at threshold", "f1"),
        ("hold-out alert rate", "alert_rate"),
    ]
    lines = [
        "# Evaluation: Isolation Forest on AI4I 2020",
        "",
        f"Dataset `{data['file']}` ({data['layout']} layout, {data['rows']} rows, sha256 "
        f"`{data['sha256'][:16]}...`). Protocol: `{proto['split']}`; "
        f"{proto['train_rows']} training rows, {proto['test_rows']} hold-out rows of which "
        f"{proto['test_failures']} failures. {proto['fit']}. Threshold: {proto['threshold']}. "
        f"Forest seed {proto['seed']}.",
        "",
        "## Results",
        "",
        f"| metric | deployed (`{report['feature_set']}`) | prototype baseline |",
        "|---|---:|---:|",
        *(f"| {label} | {report[key]:.3f} | {base[key]:.3f} |" for label, key in rows),
        "",
        f"Deployed features: {', '.join(f'`{f}`' for f in report['features'])}; "
        f"forest: {params['n_estimators']} trees, {params['max_samples']} samples per tree, "
        f"max_features {params['max_features']}, seed {params['random_state']}; "
        f"threshold {report['threshold']:.4f}.",
        "",
        f"Hold-out rows outside the training envelope (which the detector alerts on whatever "
        f"the score): {report['envelope_outside_test_rows']}, of which failures: "
        f"{report['envelope_outside_test_failures']}; the figures above are the score's alone.",
        "",
        "## Recall per failure mode",
        "",
        "| mode | hold-out rows | recall |",
        "|---|---:|---:|",
        *(
            f"| {mode} | {report['per_mode_count'][mode]} | "
            f"{_fmt(report['per_mode_recall'][mode])} |"
            for mode in report["per_mode_recall"]
        ),
        "",
        "RNF is random by construction (and mostly labelled as no failure), so no detector "
        "can find it; TWF happens at a random wear between 200 and 240 min, so a reading "
        "only says that the tool is old.",
        "",
        "## Plots",
        "",
        f"![score distributions]({SCORES_PNG})",
        "",
        f"![ROC curve]({ROC_PNG}) ![PR curve]({PR_PNG})",
        "",
        "## What got us here",
        "",
        "Each step was fitted on the same training rows (no labels) with the same seed and "
        "scored on the same hold-out; F1 uses the deployed threshold rule.",
        "",
        "| step | features | trees | samples/tree | ROC-AUC | PR-AUC | F1 |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {s['name']} ({_cell(s['why'])}) | {', '.join(s['features'])} | "
            f"{s['params']['n_estimators']} | {s['params']['max_samples']} | "
            f"{s['roc_auc']:.3f} | {s['pr_auc']:.3f} | {s['f1']:.3f} |"
            for s in report["steps"]
        ),
        "",
        f"![steps]({STEPS_PNG})",
        "",
        "- **Physics instead of raw channels.** The failure mechanisms act on the "
        "process-air temperature difference, the mechanical power (torque x speed in rad/s) "
        "and the tool strain (wear x torque) relative to the product type's overstrain "
        "limit, not on the raw channels.",
        "- **Distances to the documented boundaries.** The heat-dissipation failure needs "
        "BOTH a small temperature difference (< 8.6 K) and a low speed (< 1380 rpm): the "
        "relative margin `max(dT/8.6 K, n/1380 rpm) - 1` is negative only inside that corner, "
        "which no single channel shows. The power margin `min(P/3500 W, 9000 W/P) - 1` folds "
        "both ends of the power window into one low tail (as `|ln(P/5612 W)|` does).",
        f"- **Saturation at {HEADROOM_CAP:.0%} headroom.** An Isolation Forest isolates "
        "whatever is rare, including readings that are unusually *safe* (very high speed, "
        "large temperature difference). Capping the margins leaves those readings in one "
        "crowd, so the short paths go to readings close to or beyond a boundary. In "
        "development (seeds 0-2, 300 trees, 1024 samples) caps from 15 % to 40 % gave mean "
        "ROC-AUC 0.944-0.951 and PR-AUC 0.66-0.72, so 25 % is not a knife edge.",
        "- **Forest.** 1024 samples per tree instead of 256 let each tree resolve the thin "
        "band next to a boundary; 300 trees steady the scores across seeds. "
        "Sub-sampling features (`max_features` < 1) did not help.",
        f"- **Threshold.** `{proto['threshold']}`: an alarm budget close to the documented "
        "failure rate (3.4 %). Of the rates tried in development (1-5 %) it gave the best mean "
        "F1 over seeds 0-4 (2.5-3.5 % are within 0.01); the cut itself is a quantile of "
        "training scores, no label is involved.",
        "",
        "## Limits",
        "",
        "- The saturation is deliberate: readings that are unusually *safe* no longer stand "
        "out. Sensor faults in that direction are therefore missed, e.g. a process "
        "temperature drifting upwards (larger temperature difference) or a speed spike at low "
        "torque that stays inside the power window. A 2800 rpm speed spike is caught only "
        "when it pushes power clearly past 9000 W.",
        "- HDF readings sit in a thin band just inside their corner (margins of -8 % to 0 %), "
        "next to many safe readings just outside it, so only about half of them are flagged "
        "at a 3 % alarm budget.",
        "",
    ]
    return "\n".join(lines)
