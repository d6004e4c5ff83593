"""The run state machine as pure logic: queued -> running -> succeeded | failed | cancelled."""

from __future__ import annotations

import itertools

import pytest

from carrara.errors import Conflict
from carrara.models.training import FINISHED_STATES, RUN_STATES
from carrara.training.service import check_transition

LEGAL = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("queued", "failed"),  # a worker that cannot even start the run says why
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "queued"),  # the worker was lost: the run is queued again
}


@pytest.mark.parametrize(("current", "target"), sorted(LEGAL))
def test_legal_transitions_pass(current: str, target: str) -> None:
    check_transition(7, current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    sorted(set(itertools.product(RUN_STATES, RUN_STATES)) - LEGAL),
)
def test_every_other_transition_is_a_conflict_naming_the_state(current: str, target: str) -> None:
    with pytest.raises(Conflict) as caught:
        check_transition(7, current, target)
    assert f"run 7 is {'already ' if current in FINISHED_STATES else ''}{current}" in (
        caught.value.detail
    )
    assert target in caught.value.detail
    assert caught.value.extra == {"run_status": current}


def test_an_unknown_state_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="unknown state 'paused'"):
        check_transition(7, "paused", "running")
