"""The demo's event simulators: realistic rates, learnable structure, join-safe card choice."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from carrara.demo.events import (
    EPISODES,
    FRAUD_FEATURES,
    MERCHANTS,
    FraudSimulator,
    VitalsSimulator,
    abnormal_vitals,
    describe_vitals,
)
from carrara.demo.fraud_features import FEATURE_SQL
from carrara.demo.streaming import Pacer
from carrara.features.operator import PartitionedOperator
from carrara.features.sql import parse_feature_sql


def _matrix(payments: list) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for p in payments:
        e = p.event
        rows.append(
            [
                MERCHANTS.index(e[name]) if kind == "category" else float(e[name])
                for name, kind in FRAUD_FEATURES
            ]
        )
    return np.array(rows), np.array([p.fraud for p in payments])


def _velocity(payments: list) -> np.ndarray:
    """The demo's feature set (its SQL) computed by the platform's operator, in log order."""
    plan = parse_feature_sql(
        FEATURE_SQL.format(dataset="payments"),
        key_field="card_id",
        time_field="ts",
        fields=dict(FRAUD_FEATURES),
        label_field="fraud",
        dataset="payments",
    )
    operator = PartitionedOperator(plan)
    rows = [operator.process(0, p.card_id, p.event["ts"], p.event).values for p in payments]
    return np.array(rows, dtype=float)


def test_fraud_is_rare_learnable_and_reproducible() -> None:
    simulator = FraudSimulator(seed=1)
    history = [simulator.next() for _ in range(20_000)]
    later = [simulator.next() for _ in range(10_000)]
    x, y = _matrix(history)
    x_later, y_later = _matrix(later)
    assert 0.008 <= y.mean() <= 0.025
    model = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    raw_auc = roc_auc_score(y_later, model.predict_proba(x_later)[:, 1])
    assert raw_auc > 0.7
    for name, _ in FRAUD_FEATURES:
        assert name in history[0].event
    assert "fraud" not in history[0].event  # the label is an outcome, not an input

    # Bursts on a card are a signal the payment's own fields cannot show; its history can.
    velocity = _velocity(history + later)
    featured = HistGradientBoostingClassifier(random_state=0).fit(
        np.hstack([x, velocity[: len(history)]]), y
    )
    probabilities = featured.predict_proba(np.hstack([x_later, velocity[len(history) :]]))
    assert roc_auc_score(y_later, probabilities[:, 1]) > raw_auc + 0.05

    again = FraudSimulator(seed=1)
    assert [again.next().event for _ in range(100)] == [p.event for p in history[:100]]


def test_payments_avoid_cards_whose_outcome_is_pending() -> None:
    simulator = FraudSimulator(seed=2, cards=200, fraud_share=0.2)
    busy = {f"card-{i:05d}": i % 2 for i in range(150)}  # even: legit pending, odd: fraud
    payments = [simulator.next(busy=busy, ts_ms=123) for _ in range(3000)]
    assert any(p.fraud for p in payments)
    for p in payments:
        assert p.event["ts"] == 123
        if not p.fraud:
            assert p.card_id not in busy
        else:
            assert busy.get(p.card_id) != 0  # fraud never on a card with a legit outcome pending


def test_vital_sign_episodes_leave_the_normal_ranges() -> None:
    simulator = VitalsSimulator(seed=3, patients=10)
    normal = [simulator.next() for _ in range(2000)]
    assert {r.patient_id for r in normal} == {f"p-{i:03d}" for i in range(1, 11)}
    assert all(r.episode is None for r in normal)
    within = sum(not abnormal_vitals(r.event) for r in normal)
    assert within / len(normal) > 0.97  # nearly every normal reading is within the ranges
    expected = {
        "tachycardia": "heart rate",
        "bradycardia": "heart rate",
        "hypoxia": "SpO2",
        "hypotension": "blood pressure",
        "hypertensive crisis": "blood pressure",
        "fever": "temperature",
    }
    assert set(expected) == set(EPISODES)
    for episode, vital in expected.items():
        for patient in range(10):
            reading = simulator.reading(patient, episode)
            abnormal = abnormal_vitals(reading.event)
            assert any(text.startswith(vital) for text in abnormal), (episode, reading.event)
            assert describe_vitals(reading.event) == ", ".join(abnormal)
            assert reading.episode == episode

    mixed = [simulator.next(episode_chance=0.1) for _ in range(5000)]
    share = sum(r.episode is not None for r in mixed) / len(mixed)
    assert share == pytest.approx(0.1, abs=0.02)


def test_pacer_keeps_the_rate_without_bursting_after_a_stall() -> None:
    pacer = Pacer(rate=200)
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < 0.5:
        sent += pacer.due()
        time.sleep(0.01)
    assert 80 <= sent <= 110
    time.sleep(2.0)
    assert pacer.due() <= 200  # at most one second's worth after a stall
