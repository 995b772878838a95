"""The weekly retrain as one command: move data.end, reproduce, then propose the promotion or alert a person.

`retrain()` runs, in this order, for reasons that matter:

1. `data.end` moves to the last candle boundary at or before `--until` (only closed candles, so a later
   re-fetch of the window gives the same data), and params.yaml is committed on a new branch
   `retrain/<date>` *before* training: the model records the last commit of its inputs
   (`registry.source_commit`), which is then the same in this run and in any later clone.
2. `dvc pull`: the champion (models/production) must be present, or the gate would judge the challenger
   alone and could promote a regression. A repository with no dvc.lock yet has nothing to pull.
3. `dvc repro`, then metrics/promotion.json says promoted or rejected.
4. On a promotion: `dvc push` before any git push, so a pushed dvc.lock never names outputs the remote
   lacks; dvc.lock and metrics are committed on the branch, the pull-request body (metrics and params diffs
   against the base branch, the gate's reasons, the data window) is written, and the branch is pushed.
5. On a rejection or any failure: an alert goes to the webhook in $CRYPTOML_ALERT_WEBHOOK and the outcome
   is non-zero. Production is untouched (the promote stage only swaps it on a pass); the branch stays
   local, for inspection.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cryptoml import paths
from cryptoml.candles.timeframe import floor_to_grid
from cryptoml.config import DataParams, load_params, parse_params
from cryptoml.live.alerts import WEBHOOK_ENV, send_alert

log = logging.getLogger(__name__)

BRANCH_PREFIX = "retrain/"
# What a promotion commits; plots only if git tracks them (ignored paths are skipped).
COMMITTED_PATHS = (Path("dvc.lock"), paths.PARAMS, paths.METRICS_DIR, paths.PLOTS_DIR)
# Lines of a failed command's output kept in the error (and so in the alert).
ERROR_TAIL_LINES = 15
DVC = (sys.executable, "-m", "dvc")


class Outcome(IntEnum):
    """How a retrain ended; the value is the command's exit code."""

    PROMOTED = 0
    FAILED = 1
    REJECTED = 2


class RetrainError(RuntimeError):
    """A retrain step failed; the message names the step or command and what it printed."""


# --- pure functions -----------------------------------------------------------------------------


def utc_iso(moment: pd.Timestamp) -> str:
    """The form params.yaml uses: 2025-01-06T00:00:00Z."""
    return moment.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_until(value: str | None, now: pd.Timestamp) -> pd.Timestamp:
    """--until as a UTC time (now when not given); a time without an offset is read as UTC.

    A future time is refused: data.end would then claim candles that are not closed yet, and a
    re-fetch of the window later would return more of them, so the model could not be reproduced.
    """
    if value is None:
        return now
    try:
        until = pd.Timestamp(value)
    except ValueError:
        raise ValueError(f"--until: expected an ISO-8601 date or UTC time such as 2025-01-06T00:00:00Z, got {value!r}") from None
    until = until.tz_localize("UTC") if until.tzinfo is None else until.tz_convert("UTC")
    if until > now:
        raise ValueError(f"--until {utc_iso(until)} is in the future (now {utc_iso(now)}): its candles are not closed yet")
    return until


def new_window_end(data: DataParams, until: pd.Timestamp) -> pd.Timestamp:
    """data.end for a retrain at `until`: the open time of the candle still forming then, so every
    candle before it is closed. It must move forward: otherwise there is nothing new to train on."""
    end = floor_to_grid(until, data.timeframe)
    if end <= data.end:
        raise RetrainError(
            f"data.end is already {utc_iso(data.end)} and --until {utc_iso(until)} gives {utc_iso(end)}: "
            f"no {data.timeframe} candle closed since the last retrain, nothing new to train on"
        )
    return end


def branch_name(end: pd.Timestamp) -> str:
    return f"{BRANCH_PREFIX}{end:%Y-%m-%d}"


def _mapping_entry(node: yaml.Node, key: str, where: str) -> yaml.Node:
    if not isinstance(node, yaml.MappingNode):
        raise ValueError(f"{where}: expected a mapping")
    for key_node, value_node in node.value:
        if key_node.value == key:
            return value_node
    raise ValueError(f"{where}: missing key {key!r}")


def set_data_end(text: str, end: pd.Timestamp, source: str = str(paths.PARAMS)) -> str:
    """params.yaml text with only the value of data.end replaced, so comments and layout survive.

    The value is located by the YAML parser (not a pattern), and the result is validated as params.
    """
    value = _mapping_entry(_mapping_entry(yaml.compose(text), "data", source), "end", f"{source}: data")
    updated = f'{text[: value.start_mark.index]}"{utc_iso(end)}"{text[value.end_mark.index :]}'
    parse_params(yaml.safe_load(updated), source)
    return updated


def run_url(environ: Mapping[str, str]) -> str | None:
    """The GitHub Actions run being executed, so alerts and pull requests link to its logs."""
    keys = ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")
    if not all(environ.get(key) for key in keys):
        return None
    return f"{environ['GITHUB_SERVER_URL']}/{environ['GITHUB_REPOSITORY']}/actions/runs/{environ['GITHUB_RUN_ID']}"


def describe_source(data: DataParams) -> str:
    if data.source == "exchange":
        return f"{data.exchange.id} {data.exchange.symbol}"
    if data.source == "csv":
        return f"csv {data.csv.path}"
    return f"synthetic (seed {data.synthetic.seed})"


def describe_window(data: DataParams, data_metrics: Mapping[str, Any]) -> str:
    window = f"[{utc_iso(data.start)}, {utc_iso(data.end)}) UTC, {data.timeframe} candles from {describe_source(data)}"
    facts = data_metrics.get("data", {})
    if "rows" in facts:
        window += f": {facts['rows']} candles, {facts.get('gaps', 0)} gap(s) in the time grid"
    return window


def _bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


# The out-of-sample figures a reviewer reads first; every metric follows in a collapsed table.
HEADLINE_METRICS: tuple[tuple[str, ...], ...] = (
    *(("policy", name) for name in ("roc_auc", "log_loss_vs_prior", "brier_vs_prior")),
    ("frozen", "roc_auc"),
    *(("backtest", "rule", name) for name in ("total_return", "sharpe", "psr", "max_drawdown")),
    ("backtest", "naive", "total_return"),
    ("backtest", "buy_and_hold", "total_return"),
)
# GitHub refuses a pull-request body longer than this.
MAX_BODY_CHARS = 65_536


def _lookup(metrics: Mapping[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    node: Any = metrics
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return float(node) if isinstance(node, (int, float)) else None


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def headline_table(base_metrics: Mapping[str, Any] | None, metrics: Mapping[str, Any], base: str) -> str:
    """Key out-of-sample metrics of the base branch's policy and this one (from metrics/evaluate.json)."""
    rows = [f"| out-of-sample metric | `{base}` | this branch | change |", "|---|---:|---:|---:|"]
    for keys in HEADLINE_METRICS:
        old, new = _lookup(base_metrics, keys), _lookup(metrics, keys)
        change = f"{new - old:+.4f}" if old is not None and new is not None else "-"
        rows.append(f"| {'.'.join(keys)} | {_figure(old)} | {_figure(new)} | {change} |")
    return "\n".join(rows)


def pull_request_body(
    *,
    data: DataParams,
    data_metrics: Mapping[str, Any],
    decision: Mapping[str, Any],
    headline: str,
    metrics_diff: str,
    params_diff: str,
    base: str,
    run: str | None,
) -> str:
    """The markdown a reviewer needs: what data, why the gate passed it, what changed against `base`."""
    champion = f"`{decision['champion_sha256']}`" if decision.get("champion_sha256") else "none (first production model)"
    flat = " **with the flat rule: the bot holds no position** (its trading rule did not pay after costs)" if decision.get("trading") == "flat" else ""
    plots = f"`dvc plots diff {base}` (HTML): the `retrain-report` artifact of [the run]({run})" if run else (
        f"run `dvc pull && dvc plots diff {base}` on this branch"
    )

    def assemble(every_metric: str) -> str:
        sections = [
            f"## Retrain on data until {utc_iso(data.end)}",
            f"**Data window:** {describe_window(data, data_metrics)}",
            f"**Decision:** promoted `{decision['challenger_sha256']}`{flat}; champion it replaces: {champion}",
            f"### Quality gate (the champion compared through its stored out-of-sample predictions)\n\n{_bullets(decision['reasons'])}",
            f"### Walk-forward metrics against `{base}` (each on its own evaluation span)\n\n{headline}",
            f"<details><summary>Every metric: <code>dvc metrics diff {base} --md</code></summary>\n\n{every_metric}\n\n</details>",
            f"### Params against `{base}`\n\n{params_diff.strip() or 'no param changed'}",
            f"### Plots\n\n{plots}",
            "<sub>Opened by `cryptoml retrain`. The outputs are in the DVC remote: `dvc pull` reproduces this state.</sub>",
        ]
        return "\n\n".join(sections) + "\n"

    table = metrics_diff.strip() or "no metric changed"
    body = assemble(table)
    if len(body) > MAX_BODY_CHARS:
        body = assemble(f"too long for a pull-request body ({len(table)} characters): run `dvc metrics diff {base}`")
    return body


def rejection_alert(end: pd.Timestamp, decision: Mapping[str, Any], run: str | None) -> str:
    lines = [
        f"cryptoml retrain on data until {utc_iso(end)}: the quality gate REJECTED `{decision.get('challenger_sha256')}`; "
        "production is unchanged.",
        _bullets(decision.get("reasons", [])),
    ]
    return "\n".join(lines + ([f"Run: {run}"] if run else []))


def failure_alert(stage: str, end: pd.Timestamp | None, error: str, run: str | None) -> str:
    window = f" on data until {utc_iso(end)}" if end is not None else ""
    lines = [f"cryptoml retrain{window} FAILED while {stage}; nothing was published.", error]
    return "\n".join(lines + ([f"Run: {run}"] if run else []))


def read_decision(path: Path) -> dict[str, Any]:
    """metrics/promotion.json, checked for the one field the retrain branches on."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise RetrainError(f"{path}: the promote stage's record cannot be read ({exc})") from None
    if not isinstance(record, dict) or record.get("decision") not in {"promoted", "rejected"}:
        raise RetrainError(f"{path}: expected 'decision' to be 'promoted' or 'rejected', got {record!r:.200}")
    return record


# --- I/O edges ----------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """The environment for git and dvc, without the webhook: no tool can print what it never had."""
    return {name: value for name, value in os.environ.items() if name != WEBHOOK_ENV}


def _shown(args: Sequence[str]) -> str:
    return " ".join(["dvc", *args[len(DVC) :]] if tuple(args[: len(DVC)]) == DVC else args)


def stream(args: Sequence[str]) -> None:
    """Run a long tool (dvc pull/repro/push, git push) with its output echoed as it comes, for the CI log."""
    log.info("$ %s", _shown(args))
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env()) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
            tail.append(line)
    if process.returncode != 0:
        raise RetrainError(f"`{_shown(args)}` exited with {process.returncode}:\n{''.join(tail).strip()}")


def capture(args: Sequence[str], check: bool = True) -> str:
    """Run a quick tool and return its standard output (empty on failure if not `check`, else an error)."""
    result = subprocess.run(args, capture_output=True, text=True, env=_child_env())
    if result.returncode == 0:
        return result.stdout
    if not check:
        return ""
    raise RetrainError(f"`{_shown(args)}` exited with {result.returncode}: {(result.stderr or result.stdout).strip()}")


def _git(*args: str) -> str:
    return capture(["git", *args])


def _require_clean_tree() -> None:
    """The model is made from committed code and params only; a local edit would enter it unrecorded."""
    changed = _git("status", "--porcelain", "--untracked-files=no").rstrip()
    if changed:
        raise RetrainError(f"uncommitted changes to tracked files; commit or stash them first:\n{changed}")


def _changed(candidates: Sequence[Path]) -> list[str]:
    """Which of `candidates` git sees as modified or new; ignored paths are not listed."""
    entries = _git("status", "--porcelain", "-z", "--", *map(str, candidates)).split("\0")
    return [entry[3:] for entry in entries if entry]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_pull_request_body(base: str, pr_body: Path | None, run: str | None) -> None:
    params = load_params(paths.PARAMS)
    base_evaluation = capture(["git", "show", f"{base}:{paths.EVALUATE_METRICS.as_posix()}"], check=False)
    body = pull_request_body(
        data=params.data,
        data_metrics=_read_json(paths.DATA_METRICS),
        decision=read_decision(paths.PROMOTION_METRICS),
        headline=headline_table(json.loads(base_evaluation) if base_evaluation else None, _read_json(paths.EVALUATE_METRICS), base),
        metrics_diff=capture([*DVC, "metrics", "diff", base, "--md"]),
        params_diff=capture([*DVC, "params", "diff", base, "--md"]),
        base=base,
        run=run,
    )
    if pr_body is None:
        sys.stdout.write(body)
    else:
        pr_body.parent.mkdir(parents=True, exist_ok=True)
        pr_body.write_text(body)
        log.info("pull-request body written to %s", pr_body)


def retrain(
    until: str | None,
    *,
    base: str = "main",
    pr_body: Path | None = None,
    push: bool = False,
) -> Outcome:
    """Run the weekly retrain in the current repository (steps in the module docstring); never raises.

    `pr_body`: where the pull-request markdown goes (stdout when None); `push`: push the branch to origin.
    """
    run = run_url(os.environ)
    stage, end, branch = "reading params.yaml and --until", None, None
    try:
        params = load_params(paths.PARAMS)
        end = new_window_end(params.data, parse_until(until, pd.Timestamp.now(tz="UTC")))
        new_branch = branch_name(end)
        stage = f"creating branch {new_branch}"
        _require_clean_tree()
        _git("switch", "--create", new_branch)
        branch = new_branch
        stage = "committing the new data.end"
        paths.PARAMS.write_text(set_data_end(paths.PARAMS.read_text(), end))
        _git("commit", "--quiet", "--message", f"retrain: data.end {utc_iso(params.data.end)} -> {utc_iso(end)}", "--", str(paths.PARAMS))
        log.info("%s: training on [%s, %s)", branch, utc_iso(params.data.start), utc_iso(end))
        if Path("dvc.lock").exists():
            stage = "pulling the current outputs (dvc pull)"
            stream([*DVC, "pull"])
        stage = "reproducing the pipeline (dvc repro)"
        stream([*DVC, "repro"])
        decision = read_decision(paths.PROMOTION_METRICS)
        if decision["decision"] == "rejected":
            message = rejection_alert(end, decision, run)
            log.warning("%s", message)
            log.warning("branch %s is left local, not pushed", branch)
            send_alert(message)
            return Outcome.REJECTED
        stage = "pushing the outputs to the DVC remote (dvc push)"
        stream([*DVC, "push"])
        stage = f"committing the promotion on {branch}"
        _git("add", "--", *_changed(COMMITTED_PATHS))
        _git("commit", "--quiet", "--message", f"retrain: promote {decision['challenger_sha256']} (data until {utc_iso(end)})")
        stage = "writing the pull-request body"
        _write_pull_request_body(base, pr_body, run)
        if push:
            stage = f"pushing {branch} to origin"
            stream(["git", "push", "--set-upstream", "origin", branch])
        log.info("PROMOTED %s on %s", decision["challenger_sha256"], branch)
        return Outcome.PROMOTED
    except Exception as error:  # noqa: BLE001 (every failure must reach a person, bugs included)
        if not isinstance(error, (RetrainError, ValueError, OSError)):
            log.exception("unexpected error while %s", stage)
        message = failure_alert(stage, end, str(error) or type(error).__name__, run)
        log.error("%s", message)
        if branch is not None:
            log.error("the working copy is left on branch %s, for inspection", branch)
        send_alert(message)
        return Outcome.FAILED
