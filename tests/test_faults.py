"""The fault suite, in-process: bad candles through the real entry points, malformed frames from hypothesis,
params the schema must refuse, and artifacts the loader must refuse.

Every test here is a `fault` case (counted in the run's summary). Each bad input must end with exit code 1 and
one message naming the file, line or key, and must leave existing outputs byte-identical. Crashes, concurrent
readers, storage outages and secrets are in tests/test_promotion.py and tests/test_faults_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

from cryptoml import paths
from cryptoml.candles.store import CANDLE_COLUMNS, NUMERIC_COLUMNS, PRICE_COLUMNS, CandleValidationError, validate_candles
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import ParamsError, load_params, parse_params
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.live.serving import ServingModel
from cryptoml.model.artifacts import ArtifactError
from cryptoml.model.ensemble import ProductionEnsemble
from tests.repo import FAST_TRAINING
from tests.test_cli import workdir, write_params  # noqa: F401 (workdir is a fixture)
from tests.test_config import raw, with_value  # noqa: F401 (raw is a fixture)
from tests.test_ensemble import component_files, fit_small, rewrite_model_section

pytestmark = pytest.mark.fault

runner = CliRunner()
WARMUP = FeatureManager().warmup_rows
EDITED_LINE = 5  # the file line (header = line 1) most cases damage


# --- candle files through `cryptoml fetch` (csv source) and `cryptoml predict --input` ------------------------


def good_csv_lines() -> list[str]:
    """The header and every candle of FAST_TRAINING's window, as the csv source expects them."""
    start, end = pd.Timestamp(FAST_TRAINING["data.start"]), pd.Timestamp(FAST_TRAINING["data.end"])
    candles = simulate_candles(start, end, "1h")
    text = candles.assign(timestamp=candles["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(index=False)
    return text.splitlines()


def set_cell(lines: list[str], line: int, column: str, value: str) -> list[str]:
    """A copy of `lines` with one cell replaced; `line` counts from 1, the header being line 1."""
    fields = lines[line - 1].split(",")
    fields[CANDLE_COLUMNS.index(column)] = value
    return [*lines[: line - 1], ",".join(fields), *lines[line:]]


def swap_lines(lines: list[str], line: int) -> list[str]:
    return [*lines[: line - 1], lines[line], lines[line - 1], *lines[line + 1 :]]


def duplicate_with_other_volume(lines: list[str], line: int) -> list[str]:
    copy = set_cell(lines, line, "volume", "123456")[line - 1]
    return [*lines[:line], copy, *lines[line:]]


def retimestamp(lines: list[str], line: int, replace: tuple[str, str]) -> list[str]:
    stamp = lines[line - 1].split(",")[0]
    return set_cell(lines, line, "timestamp", stamp.replace(*replace))


@dataclass(frozen=True)
class BadCandles:
    """A damaged candle file and the message its rejection must contain (the file's path precedes it)."""

    edit: Callable[[list[str]], list[str]]
    message: str


BAD_CANDLES = {
    "empty-file": BadCandles(lambda lines: [], "empty file; expected a header timestamp,open,high,low,close,volume"),
    "header-only": BadCandles(lambda lines: lines[:1], "no candles (expected rows of timestamp,open,high,low,close,volume)"),
    "misnamed-column": BadCandles(lambda lines: [lines[0].replace("volume", "vol"), *lines[1:]], "missing column(s) ['volume']"),
    "missing-column": BadCandles(lambda lines: [line.rsplit(",", 1)[0] for line in lines], "missing column(s) ['volume']"),
    "text-in-a-number": BadCandles(
        lambda lines: set_cell(lines, EDITED_LINE, "close", "abc"), f"column 'close' must be numeric — line {EDITED_LINE}: 'abc'"
    ),
    "nan": BadCandles(lambda lines: set_cell(lines, EDITED_LINE, "open", "NaN"), f"column 'open' has a missing value (NaN or empty) — line {EDITED_LINE}"),
    "infinite": BadCandles(lambda lines: set_cell(lines, EDITED_LINE, "high", "inf"), f"column 'high' must be finite — line {EDITED_LINE}"),
    "negative-volume": BadCandles(lambda lines: set_cell(lines, EDITED_LINE, "volume", "-1"), f"volume must be >= 0 — line {EDITED_LINE}"),
    "zero-price": BadCandles(lambda lines: set_cell(lines, EDITED_LINE, "low", "0"), f"low must be > 0 — line {EDITED_LINE}"),
    "unsorted": BadCandles(lambda lines: swap_lines(lines, EDITED_LINE), f"timestamps must be strictly increasing (sort the file) — line {EDITED_LINE + 1}"),
    "conflicting-duplicate": BadCandles(
        lambda lines: duplicate_with_other_volume(lines, EDITED_LINE), f"duplicate timestamps with different values — line {EDITED_LINE}"
    ),
    "naive-timestamp": BadCandles(
        lambda lines: retimestamp(lines, EDITED_LINE, ("Z", "")), f"timestamp must be ISO-8601 UTC such as 2024-01-01T00:00:00Z — line {EDITED_LINE}"
    ),
    "non-utc-timestamp": BadCandles(
        lambda lines: retimestamp(lines, EDITED_LINE, ("Z", "+09:00")), f"timestamp must be ISO-8601 UTC such as 2024-01-01T00:00:00Z — line {EDITED_LINE}"
    ),
}
# tests/test_cli.py already sends a negative volume through `cryptoml fetch`.
FETCH_CASES = sorted(set(BAD_CANDLES) - {"negative-volume"})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def outputs(*files: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in files}


@pytest.fixture()
def fetched(workdir: Path) -> Path:  # noqa: F811 (the imported fixture)
    """A workdir whose csv source was fetched once: a bad file must leave those outputs byte-identical."""
    csv = write_lines(workdir / "candles.csv", good_csv_lines())
    write_params(workdir, {**FAST_TRAINING, "data.source": "csv", "data.csv.path": str(csv)})
    result = runner.invoke(app, ["fetch"])
    assert result.exit_code == 0, result.output
    return csv


@pytest.mark.parametrize("case", FETCH_CASES)
def test_fetch_refuses_a_bad_candle_file_and_keeps_the_previous_outputs(case: str, fetched: Path) -> None:
    before = outputs(paths.RAW_CANDLES, paths.DATA_METRICS)
    write_lines(fetched, BAD_CANDLES[case].edit(good_csv_lines()))
    result = runner.invoke(app, ["fetch"])
    assert result.exit_code == 1
    assert f"{fetched}: {BAD_CANDLES[case].message}" in result.output
    assert outputs(paths.RAW_CANDLES, paths.DATA_METRICS) == before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    fit_small().save(directory)
    return directory


def predict(csv: Path, model: Path) -> Any:
    return runner.invoke(app, ["predict", "--input", str(csv), "--model", str(model), "--json"])


@pytest.mark.parametrize("case", sorted(BAD_CANDLES))
def test_predict_refuses_a_bad_candle_file_and_prints_no_signal(case: str, workdir: Path, model_dir: Path) -> None:  # noqa: F811
    csv = write_lines(workdir / "live.csv", BAD_CANDLES[case].edit(good_csv_lines()))
    result = predict(csv, model_dir)
    assert result.exit_code == 1
    assert f"{csv}: {BAD_CANDLES[case].message}" in result.output
    assert "model_sha256" not in result.output


@pytest.mark.parametrize("rows", [1, WARMUP])
def test_too_few_candles_stop_fetch_and_predict(rows: int, fetched: Path, model_dir: Path) -> None:
    """Each row is valid; fetch and predict still refuse a file too short to use, saying how many candles they need."""
    before = outputs(paths.RAW_CANDLES, paths.DATA_METRICS)
    write_lines(fetched, good_csv_lines()[: rows + 1])
    fetch = runner.invoke(app, ["fetch"])
    assert fetch.exit_code == 1
    horizon = load_params(paths.PARAMS).label.horizon
    assert f"{fetched}: {rows} candle(s) in [data.start, data.end)" in fetch.output
    assert f"the pipeline needs at least {WARMUP + 1 + horizon} (the {WARMUP} warm-up candles" in fetch.output
    assert outputs(paths.RAW_CANDLES, paths.DATA_METRICS) == before
    prediction = predict(fetched, model_dir)
    assert prediction.exit_code == 1
    assert f"{fetched}: {rows} closed candle(s): generate_latest needs the last {LIVE_WINDOW} candles" in prediction.output


def test_gaps_are_reported_by_fetch_and_predict_not_filled(fetched: Path, model_dir: Path) -> None:
    missing, after_gap = 3, LIVE_WINDOW // 2  # the gap falls inside the candles predict computes features from
    lines = good_csv_lines()
    write_lines(fetched, [*lines[: -after_gap - missing], *lines[-after_gap:]])
    fetch = runner.invoke(app, ["fetch"])
    assert fetch.exit_code == 0, fetch.output
    assert f"1 gap(s) in the 1h grid, {missing} missing candle(s)" in fetch.output
    metrics = json.loads(paths.DATA_METRICS.read_text())["data"]
    assert (metrics["rows"], metrics["gaps"], metrics["missing_candles"]) == (len(lines) - 1 - missing, 1, missing)
    prediction = predict(fetched, model_dir)
    assert prediction.exit_code == 0, prediction.output
    assert f"1 gap(s) ({missing} missing candle(s)) in the candles the features were computed from" in prediction.output


def test_extreme_price_levels_give_finite_features_and_probabilities(fetched: Path, model_dir: Path) -> None:
    candles = pd.read_csv(fetched)
    scale = 1e12 / candles["close"].max()
    candles[list(PRICE_COLUMNS)] *= scale
    candles.to_csv(fetched, index=False)
    assert runner.invoke(app, ["fetch"]).exit_code == 0
    assert runner.invoke(app, ["features"]).exit_code == 0
    assert np.isfinite(pd.read_parquet(paths.FEATURES).to_numpy()).all()
    prediction = predict(fetched, model_dir)
    assert prediction.exit_code == 0, prediction.output
    assert 0.0 <= json.loads(prediction.output)["predictions"][0]["p_up"] <= 1.0


# --- hypothesis: malformed candle frames against the validator and the FeatureManager ------------------------

BAD_NUMBERS = (np.nan, np.inf, -np.inf, 0.0, -1.0, 1e12, -1e12, 5e-324, 1e300)


def _bad_value(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    column = draw(st.sampled_from(NUMERIC_COLUMNS))
    frame[column] = frame[column].astype(float)
    frame.loc[draw(st.integers(0, len(frame) - 1)), column] = draw(st.sampled_from(BAD_NUMBERS))
    return frame


def _text_value(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    column = draw(st.sampled_from(NUMERIC_COLUMNS))
    frame[column] = frame[column].astype(object)
    frame.loc[draw(st.integers(0, len(frame) - 1)), column] = draw(st.sampled_from(["abc", "", "1,5", None]))
    return frame


def _swap_rows(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    first, second = draw(st.integers(0, len(frame) - 1)), draw(st.integers(0, len(frame) - 1))
    order = list(range(len(frame)))
    order[first], order[second] = order[second], order[first]
    return frame.iloc[order].reset_index(drop=True)


def _duplicate_row(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    row = draw(st.integers(0, len(frame) - 1))
    copy = frame.iloc[[row]].copy()
    if draw(st.booleans()):
        copy["volume"] = 7.5  # the same timestamp with other values
    return pd.concat([frame.iloc[: row + 1], copy, frame.iloc[row + 1 :]], ignore_index=True)


def _drop_rows(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    keep = draw(st.lists(st.booleans(), min_size=len(frame), max_size=len(frame)))
    kept = frame[np.array(keep)]
    return kept.reset_index(drop=True) if len(kept) else frame.iloc[:0]


def _other_time_zone(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    stamps = frame["timestamp"]
    frame["timestamp"] = draw(
        st.sampled_from([
            stamps.dt.tz_localize(None),
            stamps.dt.tz_convert("Asia/Tokyo"),
            stamps.dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            stamps.dt.strftime("%Y-%m-%d %H:%M:%S"),
            stamps + pd.Timedelta(minutes=30),
            stamps.astype("int64"),
        ])
    )
    return frame


def _other_columns(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    column = draw(st.sampled_from(CANDLE_COLUMNS))
    if draw(st.booleans()):
        return frame.drop(columns=column)
    return frame.rename(columns={column: column.upper()})


def _integer_volume(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    frame["volume"] = frame["volume"].round().astype("int64")
    return frame


def _flat_market(draw: Any, frame: pd.DataFrame) -> pd.DataFrame:
    price = draw(st.sampled_from([1e-8, 1.0, 1e12]))
    frame[list(PRICE_COLUMNS)] = price
    frame["volume"] = draw(st.sampled_from([0.0, 1.0]))
    return frame


# In the order they apply: value changes, then row order, then the timestamp type, then the columns themselves.
MUTATIONS = (
    _integer_volume, _flat_market, _bad_value, _text_value, _swap_rows, _duplicate_row, _drop_rows, _other_time_zone, _other_columns
)


@st.composite
def candle_frames(draw: Any) -> pd.DataFrame:
    """A valid random walk of 1 to 2 x warm-up candles at a price level from 1e-6 to 1e12, then 0-3 mutations."""
    rows = draw(st.integers(1, 2 * WARMUP + 10))
    level = draw(st.sampled_from([1e-6, 1.0, 3e4, 1e12]))
    steps = draw(arrays(np.float64, rows, elements=st.floats(-0.2, 0.2)))
    wicks = draw(arrays(np.float64, (2, rows), elements=st.floats(0.0, 0.05)))
    close = level * np.exp(np.cumsum(steps))
    open_ = np.concatenate([[level], close[:-1]])
    frame = pd.DataFrame({
        "timestamp": pd.date_range("2024-01-01", periods=rows, freq="1h", tz="UTC"),
        "open": open_,
        "high": np.maximum(open_, close) * (1 + wicks[0]),
        "low": np.minimum(open_, close) * (1 - wicks[1]),
        "close": close,
        "volume": draw(arrays(np.float64, rows, elements=st.floats(0.0, 1e9))),
    })
    for mutate in sorted(draw(st.lists(st.sampled_from(MUTATIONS), max_size=3, unique=True)), key=MUTATIONS.index):
        frame = mutate(draw, frame)
    return frame


def check_validator_then_features(frame: pd.DataFrame) -> None:
    """The validator accepts or raises CandleValidationError; what it accepts gives finite features or a clear refusal."""
    try:
        candles, report = validate_candles(frame, "1h", "hypothesis")
    except CandleValidationError as exc:
        assert str(exc).startswith("hypothesis: ")
        return
    assert report.rows == len(candles) > 0
    if len(candles) <= WARMUP:
        with pytest.raises(ValueError, match=rf"need at least {WARMUP + 1} candles"):
            FeatureManager().generate_features(candles)
        return
    features = FeatureManager().generate_features(candles)
    assert len(features) == len(candles) - WARMUP
    assert np.isfinite(features.to_numpy()).all(), features[~np.isfinite(features).all(axis=1)]


def check_features_alone(frame: pd.DataFrame) -> None:
    """Unvalidated input: the FeatureManager refuses with a ValueError or returns finite features."""
    try:
        features = FeatureManager().generate_features(frame)
    except ValueError:
        return
    assert np.isfinite(features.to_numpy()).all(), features[~np.isfinite(features).all(axis=1)]


# At least these many examples; the profile's own count when it asks for more (tests/conftest.py).
FAST_EXAMPLES = max(300, settings.default.max_examples)
SLOW_EXAMPLES = max(3000, settings.default.max_examples)


@given(candle_frames())
@settings(max_examples=FAST_EXAMPLES)
def test_malformed_frames_are_refused_by_the_validator_or_give_finite_features(frame: pd.DataFrame) -> None:
    check_validator_then_features(frame)


@given(candle_frames())
@settings(max_examples=FAST_EXAMPLES)
def test_malformed_frames_are_refused_by_the_feature_manager_or_give_finite_features(frame: pd.DataFrame) -> None:
    check_features_alone(frame)


@pytest.mark.slow
@given(candle_frames())
@settings(max_examples=SLOW_EXAMPLES)
def test_many_malformed_frames_against_the_validator_and_the_feature_manager(frame: pd.DataFrame) -> None:
    check_validator_then_features(frame.copy())
    check_features_alone(frame)


# --- params.yaml ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"split.holdout": "2h"},
        {"split.holdout": 0.001, "data.start": "2024-11-01T00:00:00Z"},
        {"split.holdout": "800D"},
        {"split.holdout": 0.999},
    ],
    ids=["duration-shorter-than-warm-up", "fraction-shorter-than-warm-up", "duration-longer-than-the-window", "no-training-row-left"],
)
def test_a_holdout_that_does_not_fit_the_window_is_refused_naming_the_key(
    changes: dict[str, Any], raw: dict[str, Any]  # noqa: F811 (the imported fixture)
) -> None:
    for key, value in changes.items():
        raw = with_value(raw, key, value)
    with pytest.raises(ParamsError, match=rf"split\.holdout \({raw['split']['holdout']!r}\) holds \d+ of the \d+ labelled rows"):
        parse_params(raw)


# --- artifacts ------------------------------------------------------------------------------------------------


@pytest.fixture()
def damaged_model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "damaged"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda directory: (directory / "ensemble.json").unlink(), "ensemble.json: manifest missing"),
        (lambda directory: (directory / component_files(directory)["xgboost"]).write_bytes(b"x"), "1 bytes, the manifest says"),
        (lambda directory: shutil.rmtree(directory), "manifest missing"),
    ],
    ids=["no-manifest", "truncated-file", "no-directory"],
)
def test_predict_refuses_a_damaged_model_and_never_serves_a_stand_in(
    damage: Callable[[Path], None], message: str, damaged_model: Path, workdir: Path  # noqa: F811
) -> None:
    damage(damaged_model)
    csv = write_lines(workdir / "live.csv", good_csv_lines())
    result = predict(csv, damaged_model)
    assert result.exit_code == 1
    assert message in result.output and "model_sha256" not in result.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda model: model.pop("feature_spec_hash"), "feature_spec_hash"),
        (lambda model: model.update(feature_spec_hash="sha256:" + "0" * 64), "trained on feature spec sha256:0000"),
    ],
    ids=["metadata-key-missing", "another-feature-spec"],
)
def test_a_manifest_with_missing_or_foreign_feature_metadata_is_refused(edit: Callable[[dict[str, Any]], Any], message: str, damaged_model: Path) -> None:
    rewrite_model_section(damaged_model, edit)
    with pytest.raises(ArtifactError, match=message):
        ProductionEnsemble.load(damaged_model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda model: model.update(decision_threshold=1.5), r"decision_threshold must be in \(0, 1\).*got 1.5"),
        (lambda model: model["weights"].update(lightgbm=-1.0), r"weight of 'lightgbm' must be a finite number >= 0, got -1.0"),
        (lambda model: model["weights"].update(lightgbm=0.0, xgboost=0.0, random_forest=0.0), r"all weights are 0"),
        (lambda model: model["weights"].update(catboost=0.5), r"unknown model name\(s\) in weights: \['catboost'\]"),
        (lambda model: model.update(n_jobs=0), r"model.n_jobs must be an integer >= 1, got 0"),
        (lambda model: model.update(feature_names=model["feature_names"][::-1]), r"model.feature_names \['volume_ratio', .* are not the FeatureManager's"),
    ],
    ids=["threshold-above-1", "negative-weight", "all-zero-weights", "unknown-model", "no-threads", "features-in-another-order"],
)
def test_a_re_hashed_manifest_with_impossible_values_is_refused(edit: Callable[[dict[str, Any]], Any], message: str, damaged_model: Path) -> None:
    """The hash is a checksum, not a signature: values a forger re-hashed are checked again, by both loaders."""
    rewrite_model_section(damaged_model, edit)
    for load in (ProductionEnsemble.load, ServingModel.load):
        with pytest.raises(ArtifactError, match=rf"ensemble.json: {message}"):
            load(damaged_model)
