"""Every path the pipeline reads or writes, relative to the repository root (where dvc runs stages)."""

from pathlib import Path

PARAMS = Path("params.yaml")
EXTERNAL_DIR = Path("data/external")
RAW_CANDLES = Path("data/raw/ohlcv.parquet")
FEATURES = Path("data/features.parquet")
TRAINING_DIR = Path("models/training")
PRODUCTION_DIR = Path("models/production")
METRICS_DIR = Path("metrics")
DATA_METRICS = METRICS_DIR / "data.json"
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAINING_METADATA = TRAINING_DIR / "training_metadata.json"
EVALUATE_METRICS = METRICS_DIR / "evaluate.json"  # the headline figures, a DVC metric
EVALUATION_REPORT = METRICS_DIR / "evaluation_report.json"  # every figure; a plain output, not diffed
PROMOTION_METRICS = METRICS_DIR / "promotion.json"
PLOTS_DIR = Path("plots")
PRODUCTION_METADATA = PRODUCTION_DIR / "production_model_metadata.json"
