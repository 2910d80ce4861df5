"""The exchange's rule of a silent custodian (PROTOCOL.md §11.2), on its own clock."""

from __future__ import annotations

import time
from datetime import timedelta

from collateral_sync.v1 import valuation_pb2
from collateral_sync_reference.exchange.custodian_silence import CustodianSilence


def _policy(window: timedelta | None) -> valuation_pb2.RiskPolicy:
    policy = valuation_pb2.RiskPolicy()
    if window is not None:
        policy.custodian_staleness_window.FromTimedelta(window)
    return policy


def test_silence_counts_from_the_start_until_a_session_is_listened_to() -> None:
    silence = CustodianSilence()
    short = _policy(timedelta(milliseconds=200))
    assert not silence.is_silent(short)
    assert not silence.is_silent(_policy(None))  # 300 s when the policy sets none
    time.sleep(0.25)
    assert silence.is_silent(short)
    assert not silence.is_silent(_policy(None))


def test_the_window_is_exclusive_and_the_sessions_measure_counts() -> None:
    silence = CustodianSilence()
    heard = [timedelta(seconds=10)]
    silence.listen_to(lambda: heard[0])
    assert not silence.is_silent(_policy(timedelta(seconds=10)))  # at the window: not yet
    assert silence.is_silent(_policy(timedelta(seconds=10) - timedelta(microseconds=1)))
    heard[0] = timedelta(0)
    assert not silence.is_silent(_policy(timedelta(microseconds=1)))
