"""The bot's live path: candles as ccxt and CSV files give them, and a ServingModel that follows its directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.live.serving import ServingModel
from cryptoml.model.artifacts import MANIFEST_NAME, read_artifacts
from cryptoml.release.promotion import install_model
from tests.faults import manifest_digest, record_production_check
from tests.test_serving import fit

COLUMNS = ["timestamp", "open", "high", "low", "close", "volume"]


@pytest.fixture(scope="module")
def candles() -> pd.DataFrame:
    start = pd.Timestamp("2024-01-01", tz="UTC")
    return simulate_candles(start, start + pd.Timedelta(hours=LIVE_WINDOW + 30), "1h", seed=3)


def ccxt_rows(candles: pd.DataFrame) -> list[list[float]]:
    """What ccxt's fetch_ohlcv returns: [epoch ms (int), open, high, low, close, volume] per candle, oldest first."""
    milliseconds = candles["timestamp"].astype("int64") // 10**6
    return [[int(ms), *values] for ms, values in zip(milliseconds, candles[COLUMNS[1:]].to_numpy().tolist(), strict=True)]


def test_ccxt_rows_iso_strings_and_the_frame_give_identical_features(candles: pd.DataFrame, tmp_path: Path) -> None:
    fm = FeatureManager()
    expected = fm.generate_latest(candles, n_rows=5)
    csv = tmp_path / "candles.csv"
    candles.to_csv(csv, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")  # the README's CSV format
    offsets = candles.assign(timestamp=candles["timestamp"].dt.tz_convert("Asia/Tokyo").map(pd.Timestamp.isoformat))
    forms = {
        "ccxt rows": ccxt_rows(candles),
        "ccxt rows in a frame": pd.DataFrame(ccxt_rows(candles), columns=COLUMNS),
        "pd.read_csv of ISO ...Z": pd.read_csv(csv),
        "ISO strings with +09:00": offsets,
    }
    for name, form in forms.items():
        pd.testing.assert_frame_equal(fm.generate_latest(form, n_rows=5), expected, check_exact=True, obj=name)
    assert str(expected.index.tz) == "UTC"


@pytest.mark.parametrize(
    ("timestamps", "message"),
    [
        (lambda c: c["timestamp"].dt.tz_localize(None), "tz-aware UTC datetimes, got dtype datetime64"),
        (lambda c: c["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"), r"row 0 \('2024-01-01T00:00:00'\) has no UTC offset"),
        (lambda c: c["timestamp"].astype("int64") / 1e6, "tz-aware UTC datetimes, got dtype float64"),
    ],
)
def test_naive_or_unitless_times_are_refused_with_the_clear_error(candles: pd.DataFrame, timestamps, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureManager().generate_features(candles.assign(timestamp=timestamps(candles)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        fit(seed).save(root / f"model-{seed}")
    return [root / "model-0", root / "model-1"]


def test_reload_if_changed_follows_the_directory_and_keeps_serving_through_a_bad_swap(models: list[Path], tmp_path: Path) -> None:
    served = Path(shutil.copytree(models[0], tmp_path / "served"))
    model = ServingModel.load(served)
    first, second = (read_artifacts(path) for path in models)
    assert model.reload_if_changed() is False and model.model_sha256 == first.model_sha256
    install_model(served, second, None)
    assert model.reload_if_changed() is True and model.model_sha256 == second.model_sha256
    assert model.reload_if_changed() is False
    graph = next(name for name in second.files if name.endswith(".onnx.gz"))
    (served / graph).write_bytes(b"damaged")  # a broken copy: the reload fails, the loaded model stays
    manifest = json.loads((served / MANIFEST_NAME).read_text())
    (served / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))  # the manifest changed, so a reload is tried
    assert model.reload_if_changed() is False and model.model_sha256 == second.model_sha256
    row = FeatureManager().generate_latest(ccxt_rows(simulate_candles(pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-03-01", tz="UTC"), "1h", 5)))
    assert model.predict_proba(row).shape == (1, 2)


@pytest.mark.fault
def test_an_exact_swap_leaves_only_the_new_files_and_a_whole_model(models: list[Path], tmp_path: Path) -> None:
    served = Path(shutil.copytree(models[0], tmp_path / "served"))
    before = manifest_digest((served / MANIFEST_NAME).read_bytes())
    second = read_artifacts(models[1])
    install_model(served, second, b"{}", keep_replaced=False)
    assert sorted(path.name for path in served.iterdir()) == sorted([*second.files, MANIFEST_NAME, "production_model_metadata.json"])
    assert record_production_check(served, before=before, new=[manifest_digest(second.manifest)]) == "new"
