"""The deterministic scheduler's limits and what the seed drives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import make_config
from tests.kernels import stall

MS = 1_000_000


@pytest.fixture
def sleeper(booted):
    """A domain whose one VCPU sleeps on a timer at stall.SLEEP_NS."""
    stall.MODE = "sleep"
    yield booted(replace(make_config(), kernel="tests.kernels.stall"))
    stall.MODE = "block"


def test_a_sleeper_is_not_woken_past_the_run_limit(sleeper):
    """Before, the run fired the sleeper's timer at 50 ms although it was
    asked to stop at 5 ms: a toolstack request due at 5 ms came after the
    guest's time had passed 50 ms."""
    hv, dom = sleeper
    hv.run(until_ns=5 * MS)
    v = dom.vcpus[0]
    assert v.blocked and v.timer_deadline == stall.SLEEP_NS
    assert v.clock == 5 * MS
    hv.run(until_ns=60 * MS)
    assert v.timer_deadline == 0 and v.clock >= stall.SLEEP_NS
