"""The ``factorywatch`` command: one subcommand per role (train, detect, sensor, ...)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from factorywatch import cluster, runtime
from factorywatch.cli_common import broker_options, broker_settings, stop_on_signals
from factorywatch.errors import FactorywatchError, ModelError
from factorywatch.logs import configure_logging
from factorywatch.settings import (
    BrokerSettings,
    DataSettings,
    DetectorSettings,
    SensorSettings,
)
from factorywatch.topics import Topics, check_id

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from factorywatch.model.artifact import ModelCard
    from factorywatch.model.asset import Asset
    from factorywatch.model.recording import Recording

    BoolArray = npt.NDArray[np.bool_]

log = structlog.get_logger("factorywatch")

# Under run/ like every other local output: the repository's reports/ are the shipped
# figures, rewritten only when asked (`--out reports`, `make evaluate`).
DEFAULT_EVALUATE_OUT = Path("run") / "evaluate"


def _progress(message: str) -> None:
    print(f"» {message}", file=sys.stderr, flush=True)


# -- shared option groups -------------------------------------------------------------------
def _data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and models (env FACTORYWATCH_*)")
    group.add_argument(
        "--dataset", type=Path, help="local AI4I CSV (either layout) instead of downloading"
    )
    group.add_argument("--data-dir", type=Path, help="where downloads are kept (default data/)")
    group.add_argument(
        "--model-dir", type=Path, help="artifact directory (default model/artifacts)"
    )
    group.add_argument(
        "--no-verify", action="store_true", help="accept a dataset whose sha256 is not a known one"
    )


def _data_settings(args: argparse.Namespace) -> DataSettings:
    return DataSettings().with_overrides(
        dataset=args.dataset, data_dir=args.data_dir, model_dir=args.model_dir
    )


# -- train / evaluate / models --------------------------------------------------------------
def _add_train(sub: Any) -> None:
    from factorywatch.model.features import DEFAULT_FEATURE_SET, FEATURE_SETS  # noqa: PLC0415
    from factorywatch.model.threshold import ThresholdSpec  # noqa: PLC0415
    from factorywatch.model.train import DEFAULT_TREES  # noqa: PLC0415

    default = ThresholdSpec()
    p = sub.add_parser("train", help="train an Isolation Forest and promote it")
    _data_options(p)
    p.add_argument("--feature-set", choices=sorted(FEATURE_SETS), default=DEFAULT_FEATURE_SET)
    p.add_argument("--trees", type=int, default=DEFAULT_TREES, help="number of trees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold-method",
        choices=["far", "contamination", "quantile", "fixed"],
        default=default.method,
        help="far: target false-alarm rate on training data; contamination: scikit-learn's "
        "expected share of anomalies (same cut); quantile: of training scores; fixed: score",
    )
    p.add_argument("--threshold-value", type=float, default=default.value)
    promotion = p.add_mutually_exclusive_group()
    promotion.add_argument(
        "--no-promote", action="store_true", help="save without making it current"
    )
    promotion.add_argument(
        "--promote",
        action="store_true",
        help="make it current even over a current model of other channels (by default such a "
        "model is saved, not promoted: running detectors could not score their readings)",
    )
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when a current model exists (compose's one-shot train service)",
    )
    _csv_options(p)
    p.add_argument(
        "--asset-config",
        type=Path,
        help="YAML: channels (with unit, min, max), time_column, machine_column, groups",
    )
    route = p.add_mutually_exclusive_group()
    route.add_argument(
        "--machine",
        help="a model of this machine's own (models/machines/M; with --machine-column: its "
        "rows only); the detector routes M to it",
    )
    route.add_argument(
        "--group",
        help="a model of a group from the asset config (models/groups/G; with "
        "--machine-column: its machines' rows only)",
    )
    p.set_defaults(func=cmd_train)


def _csv_options(p: argparse.ArgumentParser) -> None:
    """Options of training (and evaluating) on any machine's own CSV recordings."""
    from factorywatch.model import calibration, generic  # noqa: PLC0415
    from factorywatch.model.families import DEFAULT_FAMILY, FAMILIES  # noqa: PLC0415
    from factorywatch.model.pipeline import SURPRISE_RATE  # noqa: PLC0415

    g = p.add_argument_group("your own data (--csv): any machine, any channels")
    g.add_argument("--csv", type=Path, help="a CSV recording (evaluate: or a folder, one per run)")
    g.add_argument("--channels", help="comma-separated channel columns (default: every numeric)")
    g.add_argument("--time-column", help="time column (dates or numbers)")
    g.add_argument("--machine-column", help="machine id column: windows and rows per machine")
    g.add_argument("--train-rows", type=int, help="train on each machine's first N rows")
    g.add_argument("--train-until", help="train on rows before this time (needs --time-column)")
    g.add_argument(
        "--preset",
        choices=[*generic.PRESETS, "ai4i"],
        default=generic.DEFAULT_PRESET,
        help="features: auto (the default: windowed for the channels whose level holds over "
        "the training rows; for a channel that trends or steps while normal, only its "
        "variability against its own slow baseline), point (channels only), windowed (+ "
        "rolling mean and log std), full (+ flat-line, deviation from baseline, rate of "
        "change), drift (each channel's departure from a slow baseline and its variability "
        "against its own slow baseline: for channels whose normal level moves), ai4i (the "
        "AI4I headroom features, for AI4I-shaped CSVs)",
    )
    g.add_argument("--window", type=int, default=generic.DEFAULT_WINDOW, help="window (rows)")
    g.add_argument(
        "--smooth", type=int, default=generic.DEFAULT_SMOOTH, help="score = mean of last N"
    )
    g.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="scorer family")
    g.add_argument(
        "--likelihood",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="score = anomaly likelihood: -log10 of the tail probability of the mean of the "
        "last 10 scores against the machine's last 1000 (started with the training scores)",
    )
    g.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each machine's threshold follows its normal score level up, by at most one "
        "spread (--no-follow: a fixed threshold)",
    )
    g.add_argument(
        "--surprise-rate",
        type=float,
        default=SURPRISE_RATE,
        metavar="RATE",
        help="a reading whose recent score level (mean of the last 10) the machine's own "
        "recent levels reach less often than RATE is an ALERT whatever its score (default "
        f"{SURPRISE_RATE}: once in a thousand readings; lower: fewer alarms in normal "
        "operation, fewer short events found)",
    )
    g.add_argument(
        "--no-surprise",
        action="store_true",
        help="no surprise rule: the threshold and the training envelope only",
    )
    g.add_argument(
        "--rebaseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a machine whose alarm stays open for as many readings as it was trained on "
        "takes the move for a new operating point: its alert clears and it recalibrates on "
        "its next as many readings (--no-rebaseline: the alarm stays open until an operator "
        "acts)",
    )
    g.add_argument(
        "--far",
        type=float,
        default=calibration.DEFAULT_FAR,
        help="target false-alarm rate on readings after training (default %(default)s)",
    )
    g.add_argument(
        "--missing",
        choices=["error", "ffill", "drop"],
        default="error",
        help="missing values: fail (default), carry the last value forward, drop the row",
    )


def train_model(args: argparse.Namespace, data: DataSettings, *, promote: bool) -> str:
    """Obtain the dataset, fit, save and (optionally) promote; return the version."""
    from factorywatch.model import artifact, dataset, train  # noqa: PLC0415
    from factorywatch.model.threshold import ThresholdSpec  # noqa: PLC0415

    explicit = data.dataset
    if explicit is None and data.dataset_dir is not None:
        found = [data.dataset_dir / n for n in (dataset.KAGGLE_FILE, dataset.UCI_FILE)]
        explicit = next((f for f in found if f.is_file()), None)
    ds = dataset.obtain(explicit, data.data_dir, verify=not args.no_verify, progress=_progress)
    forest, card = train.fit(
        ds,
        feature_set=args.feature_set,
        n_estimators=args.trees,
        seed=args.seed,
        threshold=ThresholdSpec(method=args.threshold_method, value=args.threshold_value),
        progress=_progress,
    )
    path = artifact.save(data.model_dir, forest, card)
    _progress(f"saved model {card.version} to {path}")
    if promote:
        _promote_unless_reshaped(data.model_dir, card, force=getattr(args, "promote", False))
    return card.version


def shape_change(current: ModelCard | None, new: ModelCard) -> str | None:
    """Why promoting ``new`` over ``current`` would break the detectors it serves, or None.

    A detector scores a reading with the current model only if the reading carries that
    model's channels; a model of other channels made current turns every reading of the
    machines it serves into a dead letter.
    """
    if current is None or set(new.channels) <= set(current.channels):
        return None
    return (
        f"the current model {current.version} scores channels {sorted(current.channels)}; "
        f"{new.version} needs {sorted(set(new.channels) - set(current.channels))} as well"
    )


def _promote_unless_reshaped(model_dir: Path, card: ModelCard, *, force: bool) -> bool:
    """Promote ``card``'s version unless it would break the running default; say which."""
    from factorywatch.model import artifact  # noqa: PLC0415

    current = artifact.current_version(model_dir)
    current_card = None
    if current is not None and not force:
        try:
            current_card = artifact.read_card(model_dir / current / artifact.CARD_FILE)
        except ModelError:  # an unreadable current model protects nothing
            current_card = None
    reason = shape_change(current_card, card)
    if reason is not None:
        _progress(
            f"saved, NOT promoted: {reason}, so detectors serving {current} could not score "
            f"their machines' readings. Promote it anyway with `factorywatch models promote "
            f"{card.version}` (or train with --promote), or make it one machine's own model "
            "with --machine M"
        )
        return False
    artifact.promote(model_dir, card.version)
    _progress(f"promoted {card.version} (detectors pick it up without a restart)")
    return True


def cmd_train(args: argparse.Namespace) -> int:
    """``factorywatch train``: the AI4I dataset, or any machine's CSV with ``--csv``."""
    data = _data_settings(args)
    if args.machine or args.group:  # a model of one machine's or group's own
        from factorywatch.model import artifact  # noqa: PLC0415

        kind: artifact.RouteKind = "machine" if args.machine else "group"
        try:
            folder = artifact.route_dir(data.model_dir, kind, args.machine or args.group)
        except ValueError as exc:
            raise FactorywatchError(str(exc)) from None
        data = data.with_overrides(model_dir=folder)
    if args.if_missing:
        from factorywatch.model import artifact  # noqa: PLC0415

        current = artifact.current_version(data.model_dir)
        if current is not None:
            _progress(f"model {current} is current in {data.model_dir}: not training")
            print(current)
            return 0
    if args.asset_config is not None or (args.csv is not None and args.preset != "ai4i"):
        version = train_csv_model(args, data, promote=not args.no_promote)
    else:
        if args.csv is not None:  # an AI4I-shaped CSV of the user's own
            data = data.with_overrides(dataset=args.csv)
            args.no_verify = True
        version = train_model(args, data, promote=not args.no_promote)
    print(version)
    return 0


def train_csv_model(args: argparse.Namespace, data: DataSettings, *, promote: bool) -> str:
    """Fit a generic model on a CSV (``--csv`` or the asset config), save, promote."""
    from factorywatch.model import artifact, generic  # noqa: PLC0415
    from factorywatch.model.asset import apply_asset, load_asset  # noqa: PLC0415
    from factorywatch.model.recording import load_recording, train_mask  # noqa: PLC0415

    asset = load_asset(args.asset_config) if args.asset_config else None
    csv_path = args.csv or (asset.csv if asset else None)
    if csv_path is None:
        raise FactorywatchError("give --csv FILE (or `csv:` in the asset config)")
    channels = _split_list(args.channels) or (list(asset.channels) if asset else None)
    rec = load_recording(
        csv_path,
        channels=channels,
        time_column=args.time_column or (asset.time_column if asset else None),
        machine_column=args.machine_column or (asset.machine_column if asset else None),
        missing=args.missing,
    )
    if rec.renamed:
        _progress(f"channel names mapped: {rec.renamed}")
    if rec.excluded:
        _progress(f"columns not used as channels: {rec.excluded}")
    mask = train_mask(rec, train_rows=args.train_rows, train_until=args.train_until)
    mask &= _route_rows(args, asset, rec)
    if asset is not None:
        mask = apply_asset(asset, rec, mask, progress=_progress)
    _progress(f"training on {int(mask.sum())} of {rec.rows} rows, channels {rec.channels}")
    trained = generic.fit_recording(rec, mask, _fit_spec(args), progress=_progress)
    card = trained.card
    if asset is not None:
        card = card.model_copy(update={"params": {**card.params, **asset.card_params()}})
    path = artifact.save_generic(data.model_dir, trained.scorer, card)
    _progress(f"saved model {card.version} to {path}")
    if promote:
        _promote_unless_reshaped(data.model_dir, card, force=args.promote)
    return card.version


def _route_rows(args: argparse.Namespace, asset: Asset | None, rec: Recording) -> BoolArray:
    """With ``--machine`` / ``--group`` and a machine column: only that machine's (group's)
    rows; otherwise every row."""
    import numpy as np  # noqa: PLC0415

    everything = np.ones(rec.rows, dtype=np.bool_)
    if rec.machines is None or not (args.machine or args.group):
        return everything
    if args.machine:
        keep = np.array([m == args.machine for m in rec.machines], dtype=np.bool_)
        what = f"machine {args.machine!r}"
    else:
        groups = asset.group_specs() if asset is not None else {}
        if args.group not in groups:
            raise FactorywatchError(
                f"--group {args.group!r}: not a group of the asset config ({sorted(groups)})"
            )
        spec = groups[args.group]
        keep = np.array([spec.matches(m, "") for m in rec.machines], dtype=np.bool_)
        what = f"group {args.group!r}"
    if not keep.any():
        raise FactorywatchError(f"the machine column holds no rows of {what}")
    _progress(f"training on the rows of {what}: {int(keep.sum())} of {rec.rows}")
    return keep


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate detection against the dataset's labels")
    _data_options(p)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_EVALUATE_OUT,
        help="report directory (default %(default)s; the shipped figures: --out reports)",
    )
    p.add_argument("--seed", type=int, default=0)
    _csv_options(p)
    p.add_argument("--label-column", help="with --csv: the label column (0 = normal)")
    p.add_argument(
        "--nab",
        type=Path,
        help="a folder in the Numenta Anomaly Benchmark's layout (timestamp,value CSVs under "
        "data/ and combined_windows.json): trains each file on NAB's probationary period and "
        "scores it with NAB's standard profile -> reports/nab.{json,md,png}",
    )
    p.add_argument("--trees", type=int, default=200, help="with --csv: Isolation Forest trees")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also evaluate a global point model, a per-run point model, the other scorer "
        "family and the drift and auto presets, and the per-run ones with (without) "
        "--likelihood, in the same report",
    )
    p.set_defaults(func=cmd_evaluate)


def _fit_spec(args: argparse.Namespace) -> Any:
    """The ``FitSpec`` the command line gives (train --csv, evaluate --csv/--nab)."""
    from factorywatch.model.fitspec import FitSpec  # noqa: PLC0415

    try:
        return FitSpec(
            preset=args.preset,
            window=args.window,
            smooth=args.smooth,
            family=args.family,
            far=args.far,
            trees=args.trees,
            seed=args.seed,
            likelihood=args.likelihood,
            follow=args.follow,
            surprise=None if args.no_surprise else args.surprise_rate,
            rebaseline=args.rebaseline,
        )
    except ValueError as exc:
        raise FactorywatchError(str(exc)) from None


def _evaluation_configs(args: argparse.Namespace) -> list[Any]:
    """The configuration the options give, plus the comparison ones with ``--compare``."""
    from factorywatch.model import streams  # noqa: PLC0415
    from factorywatch.model.pipeline import SURPRISE_RATE  # noqa: PLC0415

    spec = _fit_spec(args)
    mark = " likelihood" if spec.likelihood else ""
    configs = [streams.Config(name=f"per-run {spec.preset} {spec.family}{mark}", spec=spec)]
    if args.compare:
        other = "pca" if spec.family == "iforest" else "iforest"
        point = spec.replace(preset="point", smooth=1)
        configs += [
            streams.Config(name=f"global point {spec.family}", spec=point, mode="global"),
            streams.Config(name=f"per-run point {spec.family}", spec=point),
            streams.Config(name=f"per-run {spec.preset} {other}", spec=spec.replace(family=other)),
        ]
        configs += [
            streams.Config(name=f"per-run {preset} {spec.family}", spec=spec.replace(preset=preset))
            for preset in ("windowed", "drift", "auto")
            if preset != spec.preset
        ]
        # the default with the other threshold rule (following or fixed)
        rule = "fixed threshold" if spec.follow else "following threshold"
        configs.append(
            streams.Config(
                name=f"per-run {spec.preset} {spec.family} {rule}",
                spec=spec.replace(follow=not spec.follow),
            )
        )
        # the default with (or without) the surprise rule
        if not spec.likelihood:
            which = "without surprise" if spec.surprise else "with surprise"
            configs.append(
                streams.Config(
                    name=f"per-run {spec.preset} {spec.family} {which}",
                    spec=spec.replace(surprise=None if spec.surprise else SURPRISE_RATE),
                )
            )
        # the default without (or with) re-baselining after a sustained alarm
        which = "without re-baseline" if spec.rebaseline else "with re-baseline"
        configs.append(
            streams.Config(
                name=f"per-run {spec.preset} {spec.family} {which}",
                spec=spec.replace(rebaseline=not spec.rebaseline),
            )
        )
        # the same configurations with (or without) the anomaly likelihood
        flip, label = not spec.likelihood, "likelihood" if not spec.likelihood else "raw score"
        configs += [
            streams.Config(
                name=f"per-run {spec.preset} {spec.family} {label}",
                spec=spec.replace(likelihood=flip),
            ),
            streams.Config(
                name=f"per-run point {spec.family} {label}", spec=point.replace(likelihood=flip)
            ),
            streams.Config(
                name=f"per-run {spec.preset} {other} {label}",
                spec=spec.replace(family=other, likelihood=flip),
            ),
        ]
    return configs


def _print_summaries(document: dict[str, Any]) -> None:
    for entry in document["configs"]:
        s = entry["summary"]
        nab_mean = s.get("nab_normalised_mean")
        print(
            f"{entry['name']}: precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
            f"F1 {s['f1']:.3f}  FAR {s['far']:.4f} (target {entry['config']['far']})  "
            f"MAR {s['mar']:.3f}  events {s['events_detected']}/{s['events']}  "
            f"alarms {s['alarms']} ({s['false_alarms']} false)"
            + (f"  NAB {nab_mean:.1f}" if nab_mean is not None else "")
        )
    for name, value in document.get("nab_published_normalised_mean", {}).items():
        print(f"{name} (published): NAB {value:.1f}")


def cmd_evaluate_nab(args: argparse.Namespace, root: Path) -> int:
    """``factorywatch evaluate --nab DIR``: NAB's layout -> reports/nab.{json,md,png}."""
    from factorywatch.model import nab, streams  # noqa: PLC0415

    if args.preset == "ai4i":
        raise FactorywatchError("--preset ai4i is evaluated with `factorywatch evaluate --dataset`")
    files = nab.load_nab(root)
    recs = [f.recording for f in files]
    windows = [f.windows for f in files]
    configs = _evaluation_configs(args)
    results = {
        c.name: streams.evaluate(
            recs,
            c,
            train_rows=None,
            train_until=None,
            seed=args.seed,
            windows=windows,
            progress=_progress,
        )
        for c in configs
    }
    command = "factorywatch " + " ".join(sys.argv[1:]) if sys.argv[1:] else "factorywatch evaluate"
    document = streams.write_report(
        args.out,
        results,
        configs,
        command=command,
        source=f"{root} ({len(recs)} files, NAB layout: trained on each file's probationary "
        "period)",
        stem="nab",
        references=nab.published_means(root, files),
    )
    _print_summaries(document)
    print(f"report: {args.out / 'nab.md'}")
    return 0


def cmd_evaluate_csv(args: argparse.Namespace) -> int:
    """``factorywatch evaluate --csv``: labelled recordings -> reports/streams.{json,md,png}."""
    from factorywatch.model import streams  # noqa: PLC0415

    if not args.label_column:
        raise FactorywatchError("--csv needs --label-column (the anomaly labels, 0 = normal)")
    if args.train_rows is None and args.train_until is None:
        raise FactorywatchError("give --train-rows N or --train-until TIME: the part to train on")
    if args.preset == "ai4i":
        raise FactorywatchError("--preset ai4i is evaluated with `factorywatch evaluate --dataset`")
    recs = streams.load_labelled_runs(
        args.csv,
        label_column=args.label_column,
        time_column=args.time_column,
        channels=_split_list(args.channels) or None,
        machine_column=args.machine_column,
        missing=args.missing,
        progress=_progress,
    )
    configs = _evaluation_configs(args)
    results = {
        c.name: streams.evaluate(
            recs,
            c,
            train_rows=args.train_rows,
            train_until=args.train_until,
            seed=args.seed,
            progress=_progress,
        )
        for c in configs
    }
    command = "factorywatch " + " ".join(sys.argv[1:]) if sys.argv[1:] else "factorywatch evaluate"
    document = streams.write_report(
        args.out, results, configs, command=command, source=f"{args.csv} ({len(recs)} runs)"
    )
    _print_summaries(document)
    print(f"report: {args.out / streams.REPORT_FILE}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``factorywatch evaluate``: the AI4I protocol, or labelled recordings with ``--csv``."""
    from factorywatch.model import dataset, evaluate, nab  # noqa: PLC0415

    if args.nab is not None:
        return cmd_evaluate_nab(args, args.nab)
    if args.csv is not None:
        if nab.find_layout(args.csv) is not None and not args.label_column:
            return cmd_evaluate_nab(args, args.csv)  # a NAB folder given as --csv
        return cmd_evaluate_csv(args)
    data = _data_settings(args)
    ds = dataset.obtain(data.dataset, data.data_dir, verify=not args.no_verify, progress=_progress)
    result = evaluate.run(ds, args.out, seed=args.seed, progress=_progress)
    base = result["baseline"]
    print(
        f"ROC-AUC {result['roc_auc']:.3f}  PR-AUC {result['pr_auc']:.3f}  F1 {result['f1']:.3f}"
        f"   (prototype baseline: ROC-AUC {base['roc_auc']:.3f}  PR-AUC {base['pr_auc']:.3f})"
    )
    print(f"report: {args.out / 'evaluation.md'}")
    return 0


def _add_models(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list model versions, promote one, or roll back to the one before",
        description="Every promotion and roll-back is recorded in the folder's "
        "promotions.jsonl (who, when, what it replaced); `rollback` returns to the version "
        "promoted before the current one.",
    )
    _data_options(p)
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("version", nargs="?", help="version to promote")
    route = p.add_mutually_exclusive_group()
    route.add_argument("--machine", help="the models of this machine's own (models/machines/M)")
    route.add_argument("--group", help="the models of this group's own (models/groups/G)")
    p.set_defaults(func=cmd_models)


def _os_user() -> str:
    """Who runs this command, for the promotion log."""
    import getpass  # noqa: PLC0415

    try:
        return getpass.getuser()[:64] or "cli"
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return "cli"


def cmd_models(args: argparse.Namespace) -> int:
    """``factorywatch models list|promote VERSION|rollback``."""
    from factorywatch.model import artifact  # noqa: PLC0415

    data = _data_settings(args)
    top = data.model_dir
    if args.machine or args.group:
        try:
            folder = artifact.route_dir(
                data.model_dir, "machine" if args.machine else "group", args.machine or args.group
            )
        except ValueError as exc:
            raise FactorywatchError(str(exc)) from None
        data = data.with_overrides(model_dir=folder)
    if args.action == "promote":
        if not args.version:
            raise FactorywatchError("models promote needs a VERSION (see `models list`)")
        current = artifact.current_version(data.model_dir)
        try:
            artifact.promote(data.model_dir, args.version, by=_os_user())
        except ModelError as exc:
            raise FactorywatchError(
                f"refusing to promote {args.version}: the detector could not load it ({exc}); "
                f"`current` still points at {current or 'nothing'}"
            ) from exc
        print(f"promoted {args.version}")
        return 0
    if args.action == "rollback":
        current = artifact.current_version(data.model_dir)
        back = artifact.rollback(data.model_dir, by=_os_user())
        print(f"rolled back from {current} to {back}")
        return 0
    current = artifact.current_version(data.model_dir)
    for version in artifact.list_versions(data.model_dir):
        try:
            card = artifact.read_card(data.model_dir / version / artifact.CARD_FILE)
        except ModelError as exc:
            print(f"! {version}  unreadable: {str(exc).splitlines()[0][:120]}")
            continue
        mark = "*" if version == current else " "
        clear = "" if card.clear_threshold is None else f" clear={card.clear_threshold:.4f}"
        print(f"{mark} {version}  {card.feature_set:<10} threshold={card.threshold:.4f}{clear}")
        print(f"    {model_figures(card)}")
    if data.model_dir == top:
        for (kind, name), version in artifact.routed_versions(top).items():
            print(f"  {kind} {name}: {version} (models {kind}s/{name}; --{kind} {name} lists)")
    return 0


def model_figures(card: ModelCard) -> str:
    """When a model was trained, on what data, and its figures, in one line."""
    from factorywatch.model.artifact import card_summary  # noqa: PLC0415

    return card_summary(card)


# -- detect ---------------------------------------------------------------------------------
def _add_detect(sub: Any) -> None:
    p = sub.add_parser("detect", help="run the detector service")
    broker_options(p)
    _data_options(p)
    p.add_argument("--client-id", help="fixed MQTT client id (persistent session)")
    p.add_argument(
        "--transport",
        choices=("paho", "mqtt5"),
        default=None,
        help="MQTT client: mqtt5 (default: the compiled codec, less CPU per message) or paho "
        "(paho-mqtt; chosen by itself for --primary-host-id and MQTT 3.1.1)",
    )
    p.add_argument("--state-dir", type=Path, help="journal of answered readings (run/detector)")
    p.add_argument(
        "--lines", help="comma-separated lines to serve (scale out: one detector per group)"
    )
    p.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics and /healthz (9108; 0 = off)"
    )
    p.add_argument("--train-if-missing", action="store_true", help="train when no model exists")
    p.add_argument(
        "--asset-config",
        type=Path,
        help="machine groups and live calibration for the router (YAML; JSON without pyyaml)",
    )
    p.add_argument("--feature-set", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--sparkplug",
        action="store_true",
        default=None,
        help="also read Sparkplug B edge nodes (spBv1.0/...) as a host application",
    )
    p.add_argument(
        "--primary-host-id",
        help="with --sparkplug: be the Sparkplug primary host of this id (retained "
        "spBv1.0/STATE/<id>), so edge nodes store and forward while the detector is away",
    )
    p.add_argument(
        "--engine",
        choices=("mqtt", "jetstream"),
        default="mqtt",
        help="mqtt: one Mosquitto (default); jetstream: partitions of a NATS cluster",
    )
    cluster.add_detect_options(p)
    p.set_defaults(func=cmd_detect)


#: why ``detect --engine jetstream`` refuses Sparkplug (docs/guides/scale-out.md, "Limits")
SPARKPLUG_ON_CLUSTER = (
    "Sparkplug (--sparkplug, FACTORYWATCH_DETECTOR_SPARKPLUG, FACTORYWATCH_DETECTOR_SPARKPLUG_OUT)"
    " needs the Mosquitto detector (--engine mqtt): the NATS cluster's MQTT layer (nats-server "
    "2.9) refuses a topic with '.', and every Sparkplug topic starts with spBv1.0/, so it "
    "disconnects an edge node instead of storing its message"
)


def _check_transport(settings: DetectorSettings, args: argparse.Namespace) -> None:
    """Refuse, before the model loads, what no transport serves. A Sparkplug primary host
    needs Sparkplug and the Mosquitto detector on paho (its will is the STATE death, stamped
    per connect; paho is chosen by itself unless told mqtt5), as MQTT 3.1.1 does. Sparkplug, in
    or out, needs the Mosquitto detector: no Sparkplug topic passes a NATS 2.9 cluster."""
    if settings.sparkplug_primary_host_id is not None and (
        not settings.sparkplug or args.engine != "mqtt" or settings.transport == "mqtt5"
    ):
        raise ValueError(
            "--primary-host-id needs --sparkplug (FACTORYWATCH_DETECTOR_SPARKPLUG) and the "
            "Mosquitto detector on paho (--engine mqtt; --transport paho, or leave it unset)"
        )
    if (settings.sparkplug or settings.sparkplug_out) and args.engine == "jetstream":
        raise ValueError(SPARKPLUG_ON_CLUSTER)
    if args.engine == "mqtt":
        settings.transport_for(broker_settings(args).protocol)


def cmd_detect(args: argparse.Namespace) -> int:
    """``factorywatch detect``: serve until SIGTERM/SIGINT."""
    from factorywatch.detector.mosquitto_shell import DetectorService  # noqa: PLC0415
    from factorywatch.detector.mqtt5_transport import Mqtt5Transport  # noqa: PLC0415
    from factorywatch.detector.mqtt_transport import PahoTransport  # noqa: PLC0415
    from factorywatch.fencing import Fence  # noqa: PLC0415
    from factorywatch.model import artifact  # noqa: PLC0415

    data = _data_settings(args)
    if args.train_if_missing and artifact.current_version(data.model_dir) is None:
        # Only here: training needs scikit-learn and pandas, scoring does not (memory).
        from factorywatch.model.features import DEFAULT_FEATURE_SET  # noqa: PLC0415
        from factorywatch.model.threshold import ThresholdSpec  # noqa: PLC0415
        from factorywatch.model.train import DEFAULT_TREES  # noqa: PLC0415

        _progress("no model yet: training one first")
        spec = ThresholdSpec()
        args.feature_set = args.feature_set or DEFAULT_FEATURE_SET
        args.trees, args.seed = DEFAULT_TREES, 0
        args.threshold_method, args.threshold_value = spec.method, spec.value
        train_model(args, data, promote=True)
    settings = DetectorSettings().with_overrides(
        client_id=args.client_id,
        state_dir=args.state_dir,
        metrics_port=args.metrics_port,
        lines=args.lines,
        sparkplug=args.sparkplug,
        sparkplug_primary_host_id=args.primary_host_id,
        asset_config=args.asset_config,
        transport=args.transport,
    )
    _check_transport(settings, args)
    model = artifact.load(data.model_dir, scorer=settings.scorer)
    if args.engine == "jetstream":
        try:
            from factorywatch.detector import jetstream  # noqa: PLC0415
        except ImportError as exc:
            raise SystemExit(
                f"--engine jetstream needs nats-py: pip install 'factorywatch[cluster]' ({exc})"
            ) from None
        return jetstream.run_cli(
            jetstream.ClusterOptions(
                nats_servers=args.nats_servers,
                partitions=args.partitions,
                partition_count=args.partition_count,
                nats_user=args.nats_user,
                nats_password_file=args.nats_password_file,
                nats_ca=args.nats_ca,
                ack_wait_s=args.ack_wait,
                nats_mqtt=args.nats_mqtt,
                lease_ttl_s=args.lease_ttl,
            ),
            model,
            settings,
            topic_root=broker_settings(args).topic_root,
            model_dir=data.model_dir,
        )
    broker = broker_settings(args)
    if broker.secrets_dir is not None and broker.username is None:
        broker = broker.with_overrides(username="detector")
    settings = _detector_identity(settings, broker)
    stop = stop_on_signals()
    service = DetectorService(settings, broker, data.model_dir, model, stop=stop)
    fenced: list[str] = []

    def on_fenced(reason: str) -> None:
        log.error("detector_fenced", client_id=settings.client_id, reason=reason)
        fenced.append(reason)
        stop.set()

    lease = Topics(broker.topic_root).lease("detector", settings.client_id)
    if isinstance(service.transport, PahoTransport):
        Fence(service.transport.client, lease, on_fenced)
    elif isinstance(service.transport, Mqtt5Transport):
        service.transport.fence(lease, on_fenced)
    # Start-up's garbage settled before subscribing: the full collection (tens of ms) then
    # delays no reading already queued for us, and lands in start-up, not in serving.
    runtime.settle_heap()
    service.start()
    try:
        service.run(stop)
    except RuntimeError:  # paho: a publish while the newer process has the connection
        if not fenced:
            raise
    if fenced:
        raise FactorywatchError(
            f"another detector started as {settings.client_id!r} and took over its session "
            f"({fenced[0]}); this one stopped instead of fighting for it. Give each detector "
            "its own account: `factorywatch broker add-user detector-<shard> --detector`, "
            "then `detect --username detector-<shard> --lines ...`"
        )
    return 0


def _detector_identity(settings: DetectorSettings, broker: BrokerSettings) -> DetectorSettings:
    """A detector that logs in is known by its login: the broker makes it its client id."""
    if broker.username is None:
        return settings
    default = DetectorSettings.model_fields["client_id"].default
    if settings.client_id not in (default, broker.username):
        log.warning(
            "client_id_is_the_login",
            client_id=settings.client_id,
            login=broker.username,
            remedy="the broker uses the login as client id (use_username_as_clientid): give "
            "each detector its own account (`broker add-user detector-<shard> --detector`)",
        )
    return settings.with_overrides(client_id=broker.username)


# -- sensors --------------------------------------------------------------------------------
def _machine_ids(values: Sequence[str]) -> list[str]:
    ids = [m.strip() for v in values for m in v.split(",") if m.strip()]
    if not ids:
        raise FactorywatchError("give at least one --machine-id")
    if len(set(ids)) != len(ids):
        raise FactorywatchError(f"duplicate machine ids in {ids}")
    from factorywatch.accounts import COMPONENT_ACCOUNTS  # noqa: PLC0415
    from factorywatch.credentials import SERVICE_USERS  # noqa: PLC0415

    reserved = sorted(set(ids) & {*SERVICE_USERS, *COMPONENT_ACCOUNTS})
    if reserved:
        raise FactorywatchError(f"machine ids {reserved} are reserved for service users")
    return [check_id(m, "machine id") for m in ids]


def _add_sensor(sub: Any) -> None:
    from factorywatch.contracts import ANOMALY_KINDS  # noqa: PLC0415

    p = sub.add_parser("sensor", help="simulate and publish machines' readings")
    broker_options(p)
    p.add_argument(
        "--machine-id",
        action="append",
        required=True,
        help="machine id; repeat or comma-separate for several machines in one process",
    )
    p.add_argument("--line", help="production line (default line1)")
    p.add_argument("--rate", type=float, help="readings per second per machine (default 1)")
    p.add_argument("--count", type=int, help="readings per machine, then exit (default: forever)")
    p.add_argument("--seed", type=int, help="random seed (per machine: seed + index)")
    p.add_argument("--anomaly-rate", type=float, help="share of anomalous readings (0.02)")
    p.add_argument(
        "--anomalies",
        default=",".join(ANOMALY_KINDS),
        help=f"comma-separated kinds to inject (default all: {','.join(ANOMALY_KINDS)})",
    )
    p.add_argument("--seq-start", type=int, help="first sequence number (default: now in µs)")
    p.add_argument(
        "--sparkplug",
        action="store_true",
        help="publish as a Sparkplug B edge node (group = --line, devices = --machine-id)",
    )
    p.add_argument("--edge-node", default="edge1", help="Sparkplug edge node id (edge1)")
    p.set_defaults(func=cmd_sensor)


def _add_replay(sub: Any) -> None:
    p = sub.add_parser("replay", help="publish the rows of a CSV as one machine's readings")
    broker_options(p)
    p.add_argument(
        "--csv", type=Path, required=True, help="CSV: AI4I (UCI or Kaggle layout) or any machine"
    )
    p.add_argument("--machine-id", required=True)
    p.add_argument("--line", help="production line (default line1)")
    p.add_argument("--rate", type=float, help="rows per second (default 1)")
    p.add_argument("--count", type=int, help="rows to publish (default all)")
    p.add_argument(
        "--channels",
        help="any machine's CSV: comma-separated channel columns (default: every numeric one "
        "but time and label-like columns); a CSV not in the AI4I layout is replayed this way",
    )
    p.add_argument("--missing", choices=["error", "ffill", "drop"], default="error")
    p.add_argument(
        "--seq-start", type=int, help="sequence number of the first row (default: now in µs)"
    )
    p.set_defaults(func=cmd_replay)


def _sensor_settings(args: argparse.Namespace) -> SensorSettings:
    return SensorSettings().with_overrides(
        line=args.line, rate_hz=args.rate, anomaly_rate=getattr(args, "anomaly_rate", None)
    )


def cmd_sensor(args: argparse.Namespace) -> int:
    """``factorywatch sensor``: one or more simulated machines."""
    from factorywatch.sensors import publisher  # noqa: PLC0415
    from factorywatch.sensors.simulator import MachineSimulator  # noqa: PLC0415

    settings = _sensor_settings(args)
    machines = _machine_ids(args.machine_id)
    check_id(settings.line, "line")
    kinds = [k for k in args.anomalies.split(",") if k]
    seq_start = args.seq_start if args.seq_start is not None else time.time_ns() // 1000
    sims = [
        MachineSimulator(
            m,
            settings.line,
            seed=None if args.seed is None else args.seed + i,
            anomaly_rate=settings.anomaly_rate,
            anomalies=kinds,
            seq_start=seq_start,
        )
        for i, m in enumerate(machines)
    ]
    if args.sparkplug:
        from factorywatch.sensors import sparkplug  # noqa: PLC0415

        stats = sparkplug.run(
            broker_settings(args),
            settings.line,
            check_id(args.edge_node, "edge node id"),
            sims,
            rate_hz=settings.rate_hz,
            count=args.count,
            stop=stop_on_signals(),
            pending_size=settings.pending_size,
            republish_after_s=settings.republish_after_s,
            resend_answered_s=settings.resend_answered_s,
        )
        print(
            f"sent {stats.sent}, acknowledged {stats.acknowledged}, refused {stats.refused}, "
            f"rejected by the detector (so far) {stats.rejected}, answered {stats.answered}, "
            f"sent again {stats.resent}, unanswered at exit {stats.unanswered_at_close}, "
            f"given up {stats.unanswered_dropped}"
        )
        return 0 if stats.refused == 0 else 1
    streams: list[Callable[[float], Any]] = [sim.next for sim in sims]
    stats = publisher.run(
        broker_settings(args),
        streams,
        machines,
        rate_hz=settings.rate_hz,
        count=args.count,
        buffer_size=settings.buffer_size,
        stop=stop_on_signals(),
        pending_size=settings.pending_size,
        republish_after_s=settings.republish_after_s,
        resend_answered_s=settings.resend_answered_s,
    )
    print(
        f"sent {stats.sent}, acknowledged {stats.acknowledged}, refused {stats.refused}, "
        f"buffer full {stats.buffer_full}, rejected by the detector (so far) {stats.rejected}, "
        f"answered {stats.answered}, sent again {stats.resent}, "
        f"unanswered at exit {stats.unanswered_at_close}, given up {stats.unanswered_dropped}"
    )
    return 0 if stats.refused == 0 and stats.buffer_full == 0 else 1


def cmd_replay(args: argparse.Namespace) -> int:
    """``factorywatch replay``: a CSV's rows as one machine's readings."""
    from factorywatch.errors import DatasetError  # noqa: PLC0415
    from factorywatch.model.dataset import load  # noqa: PLC0415
    from factorywatch.sensors import publisher  # noqa: PLC0415
    from factorywatch.sensors.replay import replayer  # noqa: PLC0415

    settings = _sensor_settings(args)
    machine = _machine_ids([args.machine_id])[0]
    seq_start = args.seq_start if args.seq_start is not None else time.time_ns() // 1000
    try:
        if args.channels:
            raise DatasetError("channels given: replay as any machine's CSV")
        frame = load(args.csv, verify=False).frame
        stream = replayer(frame, machine, settings.line, seq_start=seq_start)
    except DatasetError:
        from factorywatch.model.recording import load_recording  # noqa: PLC0415
        from factorywatch.sensors.replay import channel_replayer  # noqa: PLC0415

        rec = load_recording(args.csv, channels=_split_list(args.channels), missing=args.missing)
        _progress(f"replaying {rec.rows} rows of channels {rec.channels}")
        columns = {c: rec.columns[c].tolist() for c in rec.channels}
        stream = channel_replayer(columns, machine, settings.line, seq_start=seq_start)
    stats = publisher.run(
        broker_settings(args),
        [stream],
        [machine],
        rate_hz=settings.rate_hz,
        count=args.count,
        buffer_size=settings.buffer_size,
        stop=stop_on_signals(),
        pending_size=settings.pending_size,
        republish_after_s=settings.republish_after_s,
        resend_answered_s=settings.resend_answered_s,
    )
    print(
        f"sent {stats.sent}, acknowledged {stats.acknowledged}, refused {stats.refused}, "
        f"answered {stats.answered}, sent again {stats.resent}, "
        f"unanswered at exit {stats.unanswered_at_close}, given up {stats.unanswered_dropped}"
    )
    return 0 if stats.refused == 0 else 1


# -- broker and demo ------------------------------------------------------------------------
DEFAULT_SECRETS = Path("secrets")
WATCH_CONNECT_RETRIES = 2  # about 1.5 s of backoff before `watch` says the broker is away


def _add_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="local Mosquitto and its users, passwords and TLS")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="run Mosquitto with the project's config")
    serve.add_argument("--port", type=int, default=1883)
    serve.add_argument("--workdir", type=Path, default=Path("run/broker"))
    serve.add_argument(
        "--secrets-dir", type=Path, help="secure mode: users, ACL and TLS from this directory"
    )
    serve.set_defaults(func=cmd_broker_serve)
    init = actions.add_parser("init", help="create service users, machine users and TLS certs")
    init.add_argument("--secrets-dir", type=Path, default=DEFAULT_SECRETS)
    init.add_argument("--machines", default="", help="comma-separated machine ids")
    init.add_argument("--line", default="line1", help="production line of these machines")
    init.add_argument("--force", action="store_true", help="rotate every password and cert")
    init.set_defaults(func=cmd_broker_init)
    add = actions.add_parser(
        "add-user",
        help="add a machine, gateway or detector account (or rotate its password)",
        description="A machine (default) may publish only its own telemetry. A gateway "
        "(--gateway --machines m1,m2) may publish batches only for the machines given. A "
        "detector account (--detector, e.g. detector-line2) serves one shard; its name is "
        "its MQTT client id. A Sparkplug B edge node (--role edge-node --line GROUP "
        "[--machines DEV1,DEV2]) publishes in its group for those devices (default any). "
        "Reload the broker afterwards (SIGHUP).",
    )
    add.add_argument("user", help="a machine id, gateway id, detector-<shard>, or a service user")
    role = add.add_mutually_exclusive_group()
    role.add_argument("--gateway", action="store_true", help="a gateway (needs --machines)")
    role.add_argument("--detector", action="store_true", help="a detector shard's account")
    role.add_argument(
        "--role",
        choices=["machine", "gateway", "edge-node", "detector", "viewer", "operator", "monitor"],
        help="the account's rights (default: machine; one account per connected process)",
    )
    add.add_argument(
        "--machines",
        default="",
        help="gateway: machines it may speak for; edge node: its device ids (default any)",
    )
    add.add_argument("--line", default="line1", help="production line of the machine(s)")
    add.add_argument("--secrets-dir", type=Path, default=DEFAULT_SECRETS)
    add.set_defaults(func=cmd_broker_add_user)
    remove = actions.add_parser("remove-user", help="remove a user")
    remove.add_argument("user")
    remove.add_argument("--secrets-dir", type=Path, default=DEFAULT_SECRETS)
    remove.set_defaults(func=cmd_broker_remove_user)


def cmd_broker_serve(args: argparse.Namespace) -> int:
    """``factorywatch broker serve``: Mosquitto in the foreground until Ctrl-C."""
    from factorywatch.broker import LocalBroker, announce_reload_pid  # noqa: PLC0415

    stop = stop_on_signals()
    # SIGHUP here (after `broker add-user`): regenerate the ACL from the registry, then let
    # Mosquitto re-read it and the password file.
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
    secrets_dir = args.secrets_dir.resolve() if args.secrets_dir else None
    broker = LocalBroker(args.workdir.resolve(), port=args.port, secrets_dir=secrets_dir).start()
    pid_file = announce_reload_pid(broker.workdir)
    tls = f", TLS on {broker.tls_port}" if broker.tls_port else ""
    _progress(f"mosquitto listening on 127.0.0.1:{broker.port}{tls} (log: {broker.log_file})")
    _progress(
        f"after `broker add-user`: kill -HUP {os.getpid()} reloads users and ACL "
        f"(`factorywatch web --broker-pid-file {pid_file}` sends it after its own changes)"
    )
    try:
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                raise FactorywatchError(f"mosquitto exited: {broker.log_tail()}")
            if reload.is_set():
                reload.clear()
                broker.reload()
                _progress("reloaded users and ACL")
    finally:
        broker.stop()
        pid_file.unlink(missing_ok=True)
    return 0


def cmd_broker_init(args: argparse.Namespace) -> int:
    """``factorywatch broker init``: users and certificates for a secure broker."""
    from factorywatch.credentials import init_secrets  # noqa: PLC0415

    machines = tuple(_machine_ids([args.machines])) if args.machines else ()
    line = check_id(args.line, "line")
    created = init_secrets(args.secrets_dir, machines, force=args.force, line=line)
    print(f"secrets in {args.secrets_dir}: created {', '.join(created) or 'nothing (all exist)'}")
    return 0


def cmd_broker_add_user(args: argparse.Namespace) -> int:
    """``factorywatch broker add-user NAME``: add or rotate; reload the broker afterwards."""
    from factorywatch.credentials import RELOAD_HINT, create_account, password_path  # noqa: PLC0415

    role = args.role or ("gateway" if args.gateway else "detector" if args.detector else None)
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    made = create_account(args.secrets_dir, args.user, role, line=args.line, machines=machines)
    print(
        f"{made.what}: new password in {password_path(args.secrets_dir, made.user)}. {RELOAD_HINT}"
    )
    return 0


def cmd_broker_remove_user(args: argparse.Namespace) -> int:
    """``factorywatch broker remove-user NAME`` (exit 2 when there is no such user)."""
    from factorywatch.credentials import RELOAD_HINT, remove_user  # noqa: PLC0415

    remove_user(args.secrets_dir, args.user)
    print(f"{args.user} removed. {RELOAD_HINT}")
    return 0


def _add_watch(sub: Any) -> None:
    p = sub.add_parser("watch", help="live terminal dashboard of every machine's alert state")
    broker_options(p)
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    p.add_argument("--once", action="store_true", help="print the current table once and exit")
    p.add_argument("--refresh", type=float, default=4.0, help="redraws per second (default 4)")
    p.add_argument("--history", type=int, default=30, help="scores per machine in the sparkline")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    """``factorywatch watch``: one row per machine until Ctrl-C (works over SSH)."""
    from rich.console import Console  # noqa: PLC0415

    from factorywatch.dashboard import run_watch  # noqa: PLC0415

    broker = broker_settings(args)
    if broker.secrets_dir is not None and broker.username is None:
        broker = broker.with_overrides(username="viewer")
    if "FACTORYWATCH_MQTT_CONNECT_RETRIES" not in os.environ:
        # Someone is looking at the screen: say within seconds that the broker is not there.
        broker = broker.with_overrides(connect_retries=WATCH_CONNECT_RETRIES)
    run_watch(
        broker,
        stop_on_signals(),
        Console(),
        duration=args.duration,
        once=args.once,
        refresh_per_second=args.refresh,
        history=args.history,
    )
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="broker + detector + three sensors, verdicts shown live")
    _data_options(p)
    p.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    p.add_argument("--rate", type=float, default=2.0, help="readings/s per machine")
    p.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """``factorywatch demo`` (``make demo``)."""
    from factorywatch.demo import run_demo  # noqa: PLC0415

    return run_demo(args, _data_settings(args), stop=stop_on_signals(), progress=_progress)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="factorywatch",
        description="Real-time anomaly detection for IoT factories over MQTT.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format", choices=["auto", "json", "console"], default="auto", help="log renderer"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train,
        _add_evaluate,
        _add_models,
        _add_detect,
        _add_sensor,
        _add_replay,
        _add_broker,
        _add_watch,
        _add_demo,
    ):
        add(sub)
    from factorywatch import clusterdeploy, opscli  # noqa: PLC0415 - their subcommands load only when the parser is built

    for add in (
        opscli.add_history,
        opscli.add_notify,
        opscli.add_web,
        opscli.add_threshold,
        clusterdeploy.add_cluster,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``factorywatch`` console script."""
    args = build_parser().parse_args(argv)
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=fmt)
    try:
        return int(args.func(args))
    except FactorywatchError as exc:
        # Printed once, for a person: a log event as well showed every error twice.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values (ids, ranges) from settings validation
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
