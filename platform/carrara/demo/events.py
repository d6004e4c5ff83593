"""Synthetic but realistic event streams for the demo: card payments and patient vital signs.

Both are simulations with learnable structure rather than noise: fraudsters take over a card and
spend fast, far from home, at night, in a few merchant categories; a patient's vitals wander
around their own baseline until an episode (tachycardia, hypoxia, fever, ...) pushes them out.

A taken-over card is used in a burst of payments minutes apart, and half of a burst's later
payments look like the cardholder's own: only the card's history (how many payments in the last
hour, the seconds since the previous one) gives them away, which the events' own fields cannot
show. The demo computes that history with a feature set in SQL. Event times run on the
simulation's clock, so live payments (produced at whatever rate the demo likes) continue the
history's timeline with the same per-card pace the models were trained on.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MERCHANTS = (
    "grocery",
    "restaurant",
    "fuel",
    "pharmacy",
    "clothing",
    "electronics",
    "travel",
    "online_gaming",
    "jewelry",
    "digital_goods",
)
# Where cardholders spend, and where fraudsters cash out (resellable or instantly delivered goods).
LEGIT_MIX = np.array([25, 18, 12, 7, 10, 4, 3, 2, 1, 8], dtype=float)
FRAUD_MIX = np.array([8, 4, 5, 2, 10, 20, 10, 12, 8, 20], dtype=float)
# Typical basket size of a category relative to the cardholder's usual payment.
AMOUNT_FACTOR = np.array([1.5, 1.0, 1.6, 0.8, 2.0, 4.0, 6.0, 0.6, 5.0, 0.5])
ONLINE = {"online_gaming", "digital_goods"}
EPOCH_MS = 1_700_000_000_000  # the simulations' clock starts here
# Payments per local hour of day (people shop in the day; fraud also runs at night).
HOUR_MIX = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.5, 3, 4, 4.5, 5, 5.5, 6, 5.5, 5, 5, 5.5, 6, 6, 5, 4, 3, 2, 1.5]
)

FRAUD_FEATURES: tuple[tuple[str, str], ...] = (
    ("amount", "float"),
    ("merchant_category", "category"),
    ("hour", "int"),
    ("amount_vs_usual", "float"),
    ("distance_km", "float"),
    ("card_present", "bool"),
)
VITALS_FEATURES: tuple[tuple[str, str], ...] = (
    ("heart_rate", "int"),
    ("systolic_bp", "int"),
    ("diastolic_bp", "int"),
    ("spo2", "int"),
    ("temperature", "float"),
)


@dataclass(frozen=True)
class Payment:
    """A card payment event (what the scorer sees) and whether it was fraud (known later)."""

    card_id: str
    event: dict[str, Any]
    fraud: int


class FraudSimulator:
    """Payments of `cards` cardholders; now and then a card is taken over for a burst of fraud.

    A burst is its first payment plus Poisson(`BURST_FOLLOW_UPS`) more, exponentially spaced
    (mean `BURST_GAP_S`); a later payment of a burst copies the cardholder's habits with
    probability `BURST_MIMIC`.
    """

    BURST_FOLLOW_UPS = 2.0
    BURST_GAP_S = 180.0
    BURST_MIMIC = 0.5

    def __init__(
        self,
        seed: int,
        cards: int = 20_000,
        fraud_share: float = 0.018,
        payments_per_card_per_day: float = 2.0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.card_ids = [f"card-{i:05d}" for i in range(cards)]
        self.usual = self.rng.lognormal(3.3, 0.6, size=cards)  # usual payment, ~27 EUR median
        self.clock_s = 0.0
        self.step_s = 86_400 / (cards * payments_per_card_per_day)
        self.burst_chance = fraud_share / (1 + self.BURST_FOLLOW_UPS)
        self.pending: list[tuple[float, int]] = []  # (due time, card) of scheduled fraud

    @property
    def now_ms(self) -> int:
        """The simulation's clock as an event time (epoch ms)."""
        return int(EPOCH_MS + self.clock_s * 1000)

    def next(self, busy: Mapping[str, int] | None = None, ts_ms: int | None = None) -> Payment:
        """The next payment. `busy` maps cards whose outcome is still pending to its label.

        A legitimate payment never lands on a busy card, and fraud never on a card with a pending
        legitimate outcome: an outcome joined by card id then always carries the right label.
        """
        busy = busy or {}
        self.clock_s += self.step_s
        if self.pending and self.pending[0][0] <= self.clock_s:
            due, card = heapq.heappop(self.pending)
            if busy.get(self.card_ids[card]) == 0:
                heapq.heappush(self.pending, (due + 60, card))  # wait for the legit outcome
            else:
                mimic = self.rng.random() < self.BURST_MIMIC
                return self._payment(card, fraud=True, ts_ms=ts_ms, mimic=mimic)
        card = self._free_card(busy)
        if self.rng.random() < self.burst_chance:
            due = self.clock_s
            for _ in range(int(self.rng.poisson(self.BURST_FOLLOW_UPS))):
                due += float(self.rng.exponential(self.BURST_GAP_S))
                heapq.heappush(self.pending, (due, card))
            return self._payment(card, fraud=True, ts_ms=ts_ms)
        return self._payment(card, fraud=False, ts_ms=ts_ms)

    def _free_card(self, busy: Mapping[str, int]) -> int:
        while True:
            card = int(self.rng.integers(len(self.card_ids)))
            if self.card_ids[card] not in busy:
                return card

    def _payment(
        self, card: int, *, fraud: bool, ts_ms: int | None, mimic: bool = False
    ) -> Payment:
        rng = self.rng
        usual = float(self.usual[card])
        hour = int(rng.choice(24, p=HOUR_MIX / HOUR_MIX.sum()))
        # Some fraud looks like the cardholder (a relative, a stolen phone, a burst's later
        # payments): its own fields cannot tell, only the card's pace can.
        if fraud and not mimic and rng.random() > 0.15:
            category = int(rng.choice(len(MERCHANTS), p=FRAUD_MIX / FRAUD_MIX.sum()))
            if rng.random() < 0.3:
                hour = int(rng.integers(0, 6))
            if rng.random() < 0.25:  # "card testing": tiny payments to see if the card works
                category = int(rng.choice([7, 9]))
                amount = float(rng.uniform(0.5, 3.0))
            else:
                amount = usual * AMOUNT_FACTOR[category] * float(rng.lognormal(0.5, 0.7))
            present = bool(rng.random() < 0.3) and MERCHANTS[category] not in ONLINE
            far = rng.random() < 0.4
            distance = float(rng.lognormal(6.0, 0.8) if far else rng.exponential(15))
        else:
            category = int(rng.choice(len(MERCHANTS), p=LEGIT_MIX / LEGIT_MIX.sum()))
            amount = usual * AMOUNT_FACTOR[category] * float(rng.lognormal(0.0, 0.45))
            online = MERCHANTS[category] in ONLINE
            present = not online and rng.random() < (0.5 if category == 6 else 0.85)
            traveling = rng.random() < 0.05
            distance = float(
                rng.lognormal(6.0, 0.8) if traveling else rng.exponential(20 if online else 5)
            )
        amount = round(max(float(amount), 0.5), 2)
        event = {
            "card_id": self.card_ids[card],
            "ts": int(ts_ms if ts_ms is not None else self.now_ms),
            "amount": amount,
            "merchant_category": MERCHANTS[category],
            "hour": hour,
            "amount_vs_usual": round(amount / usual, 4),
            "distance_km": round(distance, 1),
            "card_present": bool(present),
        }
        return Payment(self.card_ids[card], event, int(fraud))


# Normal ranges a ward's monitor would flag outside of (used to explain an alert, not to raise it).
NORMAL_RANGES = {
    "heart_rate": (50, 110, "heart rate {v}"),
    "systolic_bp": (95, 160, "blood pressure {v}/{d}"),
    "spo2": (93, 101, "SpO2 {v}%"),
    "temperature": (35.5, 38.3, "temperature {v} °C"),
}
EPISODES = ("tachycardia", "bradycardia", "hypoxia", "hypotension", "hypertensive crisis", "fever")


@dataclass(frozen=True)
class Reading:
    """A vital-signs reading and the episode injected into it (None: a normal reading)."""

    patient_id: str
    event: dict[str, Any]
    episode: str | None


class VitalsSimulator:
    """Bedside monitors of `patients` patients, each around their own baseline."""

    def __init__(self, seed: int, patients: int = 40) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.patient_ids = [f"p-{i:03d}" for i in range(1, patients + 1)]
        self.hr = rng.normal(76, 8, patients)
        self.systolic = rng.normal(122, 10, patients)
        self.spo2 = np.clip(rng.normal(97.5, 0.8, patients), 95, 99.5)
        self.temperature = rng.normal(36.8, 0.2, patients)
        self.clock_ms = 1_700_000_000_000
        self.next_patient = 0

    def next(self, episode_chance: float = 0.0, ts_ms: int | None = None) -> Reading:
        """The next reading (patients take turns); with `episode_chance`, an abnormal one."""
        patient = self.next_patient
        self.next_patient = (patient + 1) % len(self.patient_ids)
        episode = None
        if episode_chance > 0 and self.rng.random() < episode_chance:
            episode = str(self.rng.choice(EPISODES))
        return self.reading(patient, episode, ts_ms)

    def reading(self, patient: int, episode: str | None, ts_ms: int | None = None) -> Reading:
        rng = self.rng
        self.clock_ms += 1000
        hr = self.hr[patient] + rng.normal(0, 4)
        systolic = self.systolic[patient] + rng.normal(0, 6)
        spo2 = self.spo2[patient] + rng.normal(0, 0.7)
        temperature = self.temperature[patient] + rng.normal(0, 0.12)
        if episode == "tachycardia":
            hr = rng.uniform(140, 185)
            spo2 -= rng.uniform(0, 3)
        elif episode == "bradycardia":
            hr = rng.uniform(30, 40)
            systolic -= rng.uniform(10, 25)
        elif episode == "hypoxia":
            spo2 = rng.uniform(78, 88)
            hr += rng.uniform(15, 30)
        elif episode == "hypotension":
            systolic = rng.uniform(68, 85)
            hr = rng.uniform(115, 140)
        elif episode == "hypertensive crisis":
            systolic = rng.uniform(185, 220)
        elif episode == "fever":
            temperature = rng.uniform(39.3, 40.8)
            hr += rng.uniform(20, 35)
        diastolic = 0.55 * systolic + 12 + rng.normal(0, 3)
        if episode == "hypertensive crisis":
            diastolic = rng.uniform(115, 130)
        event = {
            "patient_id": self.patient_ids[patient],
            "ts": int(ts_ms if ts_ms is not None else self.clock_ms),
            "heart_rate": round(float(hr)),
            "systolic_bp": round(float(systolic)),
            "diastolic_bp": round(float(diastolic)),
            "spo2": min(100, round(float(spo2))),
            "temperature": round(float(temperature), 1),
        }
        return Reading(self.patient_ids[patient], event, episode)


def abnormal_vitals(event: Mapping[str, Any]) -> list[str]:
    """The vitals of a reading outside the ward's normal ranges, e.g. `["SpO2 84%"]`."""
    found = []
    for name, (low, high, text) in NORMAL_RANGES.items():
        value = event.get(name)
        if value is not None and not low <= value <= high:
            found.append(text.format(v=value, d=event.get("diastolic_bp")))
    return found


def describe_vitals(event: Mapping[str, Any]) -> str:
    """The vitals of a reading a nurse would look at first: the abnormal ones, else all of them."""
    abnormal = abnormal_vitals(event)
    if abnormal:
        return ", ".join(abnormal)
    return (
        f"heart rate {event.get('heart_rate')}, blood pressure {event.get('systolic_bp')}/"
        f"{event.get('diastolic_bp')}, SpO2 {event.get('spo2')}%, "
        f"temperature {event.get('temperature')} °C"
    )
