"""The UI's form parsing and chart data: pure functions between HTML forms and the API's bodies."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.datastructures import FormData

from carrara.datasets.schemas import DatasetCreate
from carrara.deployments.schemas import DeploymentPut
from carrara.errors import Invalid
from carrara.monitoring.schemas import MetricsOut
from carrara.training.algorithms import ALGORITHMS, validate_params
from carrara.ui.charts import chart_data, time_axis, total_predictions
from carrara.ui.deployment_forms import (
    deployment_body,
    deployment_errors,
    spec_diff,
    variant_rows,
    with_challenger,
)
from carrara.ui.forms import (
    FORM,
    FormInvalid,
    _feature_line,
    control_problem,
    dataset_body,
    dataset_form,
    errors_from_validation,
    form_words,
    param_errors,
    param_fields,
    params_from_form,
    parse_features,
    parse_offsets,
    snapshot_body,
)
from carrara.ui.pages.signin import safe_next


def test_features_are_read_one_per_line_and_bad_lines_are_named() -> None:
    assert parse_features("amount: float\n\n# comment\nmerchant category\n a b : int ") == [
        {"name": "amount", "type": "float"},
        {"name": "merchant", "type": "category"},
        {"name": "a b", "type": "int"},
    ]
    with pytest.raises(FormInvalid) as bad:
        parse_features("amount: float\namount: decimal")
    assert bad.value.errors == {
        "features": "line 2 ('amount: decimal'): write `name: type` "
        "(float, int, bool, category, string)"
    }
    with pytest.raises(FormInvalid, match="at least one feature"):
        parse_features("  \n")


def test_the_dataset_form_becomes_the_api_body() -> None:
    form = {
        "name": " cards ",
        "topic": "payments",
        "key_field": "user",
        "label_field": "",
        "event_time_field": "ts",
        "task": "anomaly",
        "features": "amount: float",
        "create_topic": "on",
        "partitions": "6",
    }
    body = dataset_body(form)
    assert body["name"] == "cards"
    assert body["label_field"] is None
    assert body["create_topic"] == {"partitions": 6}
    DatasetCreate.model_validate(body)  # the API accepts it
    with pytest.raises(FormInvalid) as bad:
        dataset_body({**form, "partitions": "six", "features": "oops"})
    assert set(bad.value.errors) == {"features", "partitions"}


def test_validation_errors_are_keyed_by_the_form_field() -> None:
    form = {
        "name": "cards",
        "topic": "t",
        "key_field": "k",
        "task": "binary",
        "features": "a: float",
    }
    with pytest.raises(ValidationError) as exc:
        DatasetCreate.model_validate(dataset_body({**form, "name": "Bad Name"}))
    errors = errors_from_validation(exc.value)
    assert list(errors) == ["name"]
    assert errors["name"].startswith("use lowercase letters, digits")
    # A rule across fields has no single input: it is shown above the form...
    with pytest.raises(ValidationError) as exc:
        DatasetCreate.model_validate(dataset_body(form))
    assert errors_from_validation(exc.value) == {FORM: "label_field is required for a binary task"}
    # ...unless it names a field of the form: then it is shown on that field.
    fields = DatasetCreate.model_fields
    assert errors_from_validation(exc.value, fields=fields) == {
        "label_field": "is required for a binary task"
    }


def test_snapshot_and_offsets_forms() -> None:
    assert snapshot_body({"mode": "latest"}) == {"mode": "latest", "description": ""}
    assert snapshot_body({"mode": "time_range", "from": "2024-01-01T00:00", "to": ""}) == {
        "mode": "time_range",
        "description": "",
        "from": "2024-01-01T00:00",
        "to": None,
    }
    assert parse_offsets("0: 0-100\n 1:5 - 7 \n") == [
        {"partition": 0, "start": 0, "end": 100},
        {"partition": 1, "start": 5, "end": 7},
    ]
    with pytest.raises(FormInvalid, match="line 1"):
        parse_offsets("p0 0..100")


def test_params_forms_are_generated_from_every_algorithms_schema() -> None:
    for algorithm in ALGORITHMS.values():
        fields = param_fields(algorithm.params_schema())
        names = [f.name for f in fields]
        assert set(names) == set(algorithm.params_model.model_fields), algorithm.name
        assert names[-2:] == ["bad_event_threshold", "seed"]  # the common ones last
        # An untouched form (every input showing its default) means the defaults.
        untouched: dict[str, Any] = {}
        for f in fields:
            if f.kind == "boolean":
                untouched[f"param.{f.name}"] = "true" if f.default else "false"
        task = algorithm.tasks[0]
        assert validate_params(algorithm.name, task, params_from_form(fields, untouched)) == (
            validate_params(algorithm.name, task, {})
        )


def test_params_from_the_form_are_validated_by_the_algorithm() -> None:
    fields = {f.name: f for f in param_fields(ALGORITHMS["random_forest"].params_schema())}
    assert fields["n_estimators"].kind == "integer"
    assert fields["n_estimators"].bounds == ("≥ 1 and ≤ 5,000")
    assert fields["max_depth"].nullable
    assert fields["max_depth"].default_text == ""
    assert fields["max_features"].bounds == "> 0 and ≤ 1"
    assert fields["class_weight"].kind == "choice"
    assert fields["class_weight"].choices == ("balanced",)
    seed = param_fields(ALGORITHMS["lightgbm"].params_schema())[-1]
    assert seed.bounds == "≥ 0 and ≤ 4,294,967,295"

    form = FormData(
        [
            ("param.n_estimators", "50"),
            ("param.max_depth", ""),
            ("param.class_weight", "none"),
            ("param.max_features", "0.5"),
        ]
    )
    params = params_from_form(list(fields.values()), form)
    assert params == {"n_estimators": "50", "class_weight": None, "max_features": "0.5"}
    validated = validate_params("random_forest", "binary", params)
    assert validated["n_estimators"] == 50
    assert validated["max_depth"] is None

    with pytest.raises(Invalid) as bad:
        validate_params("random_forest", "binary", {"n_estimators": "0"})
    errors = param_errors({e["field"]: e["message"] for e in bad.value.extra["errors"]})
    assert list(errors) == ["param.n_estimators"]

    autoencoder = param_fields(ALGORITHMS["autoencoder"].params_schema())
    layers = params_from_form(autoencoder, {"param.hidden_layers": "[64, 16 ,64]"})
    assert validate_params("autoencoder", "anomaly", layers)["hidden_layers"] == [64, 16, 64]
    hist = param_fields(ALGORITHMS["hist_gradient_boosting"].params_schema())
    # A ticked checkbox sends "true" after the hidden "false"; an unticked one only "false".
    ticked = FormData([("param.early_stopping", "false"), ("param.early_stopping", "true")])
    assert params_from_form(hist, ticked) == {"early_stopping": True}
    unticked = FormData([("param.early_stopping", "false")])
    assert params_from_form(hist, unticked) == {"early_stopping": False}


DEPLOYMENT_FORM = {
    "input_topic": "in",
    "output_topic": "out",
    "key_field": "user",
    "pool": "",
    "reason": "more traffic",
    "variants-0-name": "a",
    "variants-0-model": "m",
    "variants-0-version": "3",
    "variants-0-weight": "90",
    "variants-1-name": "b",
    "variants-1-model": "m",
    "variants-1-version": "challenger",
    "variants-1-weight": "10",
    "variants-2-name": "",
    "variants-2-model": "",
    "variants-3-name": "s",
    "variants-3-model": "m",
    "variants-3-version": "1",
    "variants-3-weight": "0",
    "variants-3-shadow": "on",
    "variants-3-shadow_sample_pct": "25",
}


def test_variant_rows_and_the_deployment_body() -> None:
    assert variant_rows(DEPLOYMENT_FORM) == [
        {"name": "a", "model": "m", "shadow": False, "version": 3, "weight": 90},
        {"name": "b", "model": "m", "shadow": False, "alias": "challenger", "weight": 10},
        {"name": "s", "model": "m", "shadow": True, "version": 1, "weight": 0,
         "shadow_sample_pct": "25"},
    ]  # fmt: skip
    current = {
        "monitoring": {"outcomes_topic": "outcomes", "metric": "accuracy", "alpha": 0.01},
        "policy": {"auto_rollback": True},
        "output_format": "avro",
        "include_features": True,
    }
    body = deployment_body({**DEPLOYMENT_FORM, "outcomes_topic": "outcomes"}, current)
    assert body["pool"] == "default"
    # Settings the form does not show are kept: a weight change never drops them.
    assert body["monitoring"]["metric"] == "accuracy"
    assert body["monitoring"]["alpha"] == 0.01
    assert body["policy"] == {"auto_rollback": True}
    assert (body["output_format"], body["include_features"]) == ("avro", True)
    put = DeploymentPut.model_validate(body)
    assert (put.output_format, put.include_features) == ("avro", True)
    assert put.variants[2].shadow_sample_pct == 25
    cleared = deployment_body({**DEPLOYMENT_FORM, "outcomes_topic": ""}, current)
    assert "outcomes_topic" not in cleared["monitoring"]
    assert "monitoring" not in deployment_body(DEPLOYMENT_FORM)

    bad = {**DEPLOYMENT_FORM, "variants-0-weight": "eighty"}
    with pytest.raises(ValidationError):
        DeploymentPut.model_validate(deployment_body(bad))


def test_a_challenger_takes_its_share_from_the_busiest_live_variant() -> None:
    variants = [
        {"name": "a", "model": "m", "version": 1, "weight": 70, "shadow": False},
        {"name": "b", "model": "m", "version": 2, "weight": 30, "shadow": False},
        {"name": "s", "model": "m", "version": 3, "weight": 0, "shadow": True},
    ]
    rows = with_challenger(variants, "challenger", "m", 4)
    assert [(r["name"], r["weight"]) for r in rows] == [
        ("a", 60),
        ("b", 30),
        ("s", 0),
        ("challenger", 10),
    ]
    assert variants[0]["weight"] == 70  # the input is not changed


def test_the_diff_names_what_a_new_revision_changes() -> None:
    before = {
        "input_topic": "in",
        "pool": "default",
        "variants": [
            {"name": "a", "model": "m", "version": 1, "weight": 100, "shadow": False},
            {"name": "old", "model": "m", "version": 1, "weight": 0, "shadow": True},
        ],
    }
    after = {
        "input_topic": "in",
        "pool": "gpu",
        "variants": [
            {"name": "a", "model": "m", "version": 1, "weight": 90, "shadow": False},
            {"name": "b", "model": "m", "version": 2, "weight": 10, "shadow": False},
        ],
    }
    diff = spec_diff(before, after)
    assert [(v.name, v.change, v.changed_fields) for v in diff.variants] == [
        ("a", "changed", ["weight"]),
        ("b", "added", []),
        ("old", "removed", []),
    ]
    assert diff.settings == [("pool", "default", "gpu")]
    assert not diff.empty
    assert spec_diff(after, after).empty
    assert [v.change for v in spec_diff(None, after).variants] == ["added", "added"]


def _metrics(variants: list[dict[str, Any]], task: str = "binary") -> MetricsOut:
    end = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    return MetricsOut.model_validate(
        {
            "deployment": "d",
            "start": end - timedelta(minutes=5),
            "end": end,
            "bucket": "minute",
            "task": task,
            "latency_edges_ms": [1.0],
            "variants": variants,
            "outcome_stats": {
                "matched": 0, "late": 0, "unmatched": 0, "invalid": 0, "expired_predictions": 0
            },
        }
    )  # fmt: skip


def _point(minute: int, predictions: int, dead: int = 0, accuracy: float | None = None) -> dict:
    return {
        "bucket_start": datetime(2024, 5, 1, 11, minute, tzinfo=UTC),
        "predictions": predictions,
        "dead_letters": dead,
        "mean_score": 0.5,
        "score_histogram": [predictions] + [0] * 19,
        "latency_histogram": [predictions, 0],
        "p50_latency_ms": 1.0,
        "p99_latency_ms": 2.0,
        "outcomes": 0,
        "accuracy": accuracy,
        "log_loss": None,
        "rmse": None,
        "mae": None,
    }


def _variant(name: str, points: list[dict], shadow: bool = False) -> dict[str, Any]:
    totals = {**points[-1], "predictions": sum(p["predictions"] for p in points), "auc": None}
    totals["dead_letters"] = sum(p["dead_letters"] for p in points)
    totals.pop("bucket_start")
    return {"variant": name, "shadow": shadow, "model_version": 1, "series": points,
            "totals": totals}  # fmt: skip


def test_chart_series_share_one_time_axis_over_the_whole_window() -> None:
    axis = time_axis(
        datetime(2024, 5, 1, 11, 55, 30, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC),
        "minute",
    )
    assert [t.minute for t in axis] == [55, 56, 57, 58, 59, 0]
    metrics = _metrics(
        [
            _variant("a", [_point(56, 90, accuracy=0.8), _point(58, 80, dead=20)]),
            _variant("b", [_point(58, 10)]),
            _variant("s", [_point(57, 100)], shadow=True),
            _variant("-", [_point(58, 0, dead=11)]),
        ]
    )
    data = chart_data(metrics)
    assert len(data["labels"]) == 6
    a, b, s, unrouted = data["series"]
    # No events in a minute: 0 scored; but the minute still filling (12:00 of a window ending at
    # 12:00:30) is not a 0, and is flagged as partial (drawn dotted, never as a drop).
    assert a["throughput"] == [0, 90, 0, 80, 0, None]
    assert data["partial"] is True
    assert a["p50"] == [None, 1.0, None, 1.0, None, None]  # ...and no latency (a gap)
    assert a["quality"][1] == 0.8
    assert a["dead_letter_rate"][3] == 0.2  # 20 of its 100 events
    assert b["scores"][0] == 1.0
    assert s["shadow"]
    assert unrouted["name"] == "not routed"
    assert not unrouted["routed"]
    assert unrouted["throughput"] == [None] * 6
    # Not-routed dead letters against every live event of the minute (80 + 20 + 10 + 11).
    assert unrouted["dead_letter_rate"][3] == pytest.approx(11 / 121)
    assert data["quality_label"] == "Live accuracy"
    assert data["quality_is_rate"]
    assert total_predictions(metrics) == 180  # live variants only
    assert chart_data(_metrics([], task="regression"))["quality_label"] == "Live RMSE"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/runs?status=failed", "/ui/runs?status=failed"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/api/v1/tokens", "/ui/"),
        (None, "/ui/"),
    ],
)
def test_sign_in_returns_only_to_ui_pages(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_feature_line_parser_runs_in_linear_time_on_the_worst_case() -> None:
    # The old regex (a lazy name, then spaces around the separator) took 18 s on 2,000 spaces.
    for raw in ("a" + " " * 20_000, " " * 20_000 + "x", "a" + " " * 20_000 + "x!", ":" * 20_000):
        started = time.perf_counter()
        with pytest.raises(FormInvalid):
            parse_features(raw)
        assert time.perf_counter() - started < 0.1


_OLD_FEATURE_LINE = re.compile(r"^\s*(?P<name>[^:\s][^:]*?)\s*[:\s]\s*(?P<type>[a-z]+)\s*$")


@given(st.text(alphabet="ab: \t:x1", max_size=12))
def test_the_feature_line_parser_reads_what_the_old_regex_read(line: str) -> None:
    old = _OLD_FEATURE_LINE.match(line)
    assert _feature_line(line) == (None if old is None else (old["name"], old["type"]))


def test_validation_messages_read_like_a_person_wrote_them() -> None:
    """No regex patterns, no zero-based indexes; empty is "required"; too long says by how much."""
    empty = {"name": "", "topic": "", "key_field": "", "task": "binary", "features": ""}
    body, errors = dataset_form(empty)
    with pytest.raises(ValidationError) as exc:
        DatasetCreate.model_validate(body)
    errors = {**errors_from_validation(exc.value, fields=DatasetCreate.model_fields), **errors}
    # Every invalid field at once.
    assert errors["name"] == "required"
    assert errors["topic"] == "required"
    assert errors["key_field"] == "required"
    assert errors["features"].startswith("declare at least one feature")
    assert not any("pattern" in message or "^" in message for message in errors.values())

    long = {**empty, "name": "a" * 300, "description": "x\x07y", "features": "a: float"}
    _, errors = dataset_form(long)
    assert errors["name"] == "too long: at most 100 characters (this has 300)"
    assert errors["description"].startswith("must not contain control characters")
    assert control_problem("line\nbreak") is not None
    assert control_problem("line\nbreak", multiline=True) is None
    assert control_problem("zero\u200bwidth", multiline=True) is not None
    assert form_words(
        "topic 't' does not exist in Kafka: create it first, or pass "
        "`create_topic: {partitions: N}` to have it created"
    ).endswith("or tick “Create the topic” to have it created")


def test_deployment_errors_name_the_variant_as_the_form_numbers_it() -> None:
    form = {
        "input_topic": "in",
        "output_topic": "in",
        "key_field": "",
        "pool": "Bad Pool",
        "variants-0-name": "champion",
        "variants-0-model": "m",
        "variants-0-version": "1",
        "variants-0-weight": "ninety",
        # row 2 (index 1) left empty: the next variant is the form's Variant 3
        "variants-2-name": "challenger",
        "variants-2-model": "m",
        "variants-2-version": "champion!",
        "variants-2-weight": "10",
    }
    with pytest.raises(ValidationError) as exc:
        DeploymentPut.model_validate(deployment_body(form))
    errors = deployment_errors(exc.value, form)
    assert errors["variants-0-weight"] == "Variant 1 weight: a whole number"
    assert errors["variants-2-version"].startswith("Variant 3 version or alias: use lowercase")
    assert errors["key_field"] == "required"
    assert errors["pool"].startswith("use lowercase letters")
    assert "0." not in " ".join(errors.values())
    assert not any("pattern" in message for message in errors.values())
