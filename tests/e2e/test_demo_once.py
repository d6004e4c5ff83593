"""`carrara demo --once` (what `make demo ARGS=--once` runs): both scenarios end to end.

The infrastructure is the stack `make test` started; the demo starts the API, a training worker,
two scorers and the monitor itself, drives everything through the public REST API and Kafka, and
stops what it started. Exit 0 means every step worked: runs beat their baselines, the velocity
features in SQL beat the raw fields offline and live, the deployments serve on both scorers,
every streamed event got a prediction, every outcome was joined, the A/B verdict was computed and
injected vital-sign episodes were flagged far above the normal rate.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import orjson

from carrara.settings import Settings
from tests.conftest import ROOT

CARRARA = str(Path(sys.executable).parent / "carrara")
STEPS = tuple(f"1.{i}" for i in range(1, 12))
STEPS += ("2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def _status() -> dict[str, dict[str, object]]:
    result = subprocess.run(
        [CARRARA, "stack", "status", "--json"], cwd=ROOT, capture_output=True, check=False
    )
    return {s["name"]: s for s in orjson.loads(result.stdout)}


def test_demo_once_runs_both_scenarios_and_every_step_works(stack_settings: Settings) -> None:
    ports = (stack_settings.api_port, 9401, 9402)
    busy = [p for p in ports if not _port_free(stack_settings.host, p)]
    assert not busy, f"the demo needs these ports free: {busy}"

    result = subprocess.run(
        [CARRARA, "demo", "--once"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "220"},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, output[-8000:] + result.stderr[-3000:]
    assert "every step worked" in output
    assert "FAILED" not in output
    summary = output[output.index("Demo summary") :]
    for number in STEPS:
        row = next((line for line in summary.splitlines() if f" {number} " in line), None)
        assert row is not None, f"step {number} is missing from the summary"
        assert " ok " in row, f"step {number}: {row}"

    # The numbers behind the checks, as printed (rich wraps long lines: compare words).
    flat = " ".join(output.split())
    runs = re.search(
        r"logistic regression v\d+ AUC (0\.\d+), LightGBM v\d+ AUC (0\.\d+), AutoML v\d+ AUC "
        r"(0\.\d+), LightGBM \+ velocity SQL v\d+ AUC (0\.\d+)",
        flat,
    )
    assert runs is not None
    assert min(float(runs[1]), float(runs[2]), float(runs[3])) > 0.7  # the raw fields
    assert float(runs[4]) >= float(runs[2]) + 0.02  # the same LightGBM, with velocity features
    assert re.search(r"PUT /api/v1/datasets/demo-fraud-\w+/features → revision 1: txn_1h", flat)
    live = re.search(r"velocity features AUC (0\.\d+) vs\. raw fields (0\.\d+)", flat)
    assert live is not None
    assert float(live[1]) > float(live[2])  # live, on the same payments
    assert "Live payments in a burst: the features the scorer computed" in flat
    assert re.search(r"4,000 payments \(\d+ fraud\) → 4,000 predictions \+ 4,000 shadow", flat)
    assert "4,000 outcomes joined" in flat
    assert "2/2 scorers on revision 1" in flat
    for challenger in ("logreg", "lightgbm-raw", "automl"):
        assert f"challenger {challenger} vs. champion lightgbm-sql" in flat
    flagged = re.search(r"(\d+) of (\d+) episodes flagged .*?(\d+) false alarms in ([\d,]+)", flat)
    assert flagged is not None
    hit_rate = int(flagged[1]) / int(flagged[2])
    false_rate = int(flagged[3]) / int(flagged[4].replace(",", ""))
    assert hit_rate >= 0.5
    assert hit_rate >= 5 * false_rate
    assert "ALERT: patient p-" in flat
    assert "alert the doctor" in flat
    for where in (f"{stack_settings.api_url}/docs", stack_settings.mlflow_url, "Admin token"):
        assert where in flat

    # Everything the demo started is stopped again; the infrastructure keeps running.
    status = _status()
    for name in ("api", "worker", "scorer-1", "scorer-2", "monitor"):
        assert status[name]["pid"] is None, name
    assert status["kafka"]["healthy"]
