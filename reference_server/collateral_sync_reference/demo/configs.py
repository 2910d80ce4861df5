"""The configuration files the demo writes for its custodian, exchange and regulator."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from collateral_sync_reference.demo.scenario import (
    ACCOUNT,
    BREAK,
    CLIENT,
    CUSTODIAN,
    EXCHANGE,
    HOLDINGS,
    HOUSE_ACCOUNT,
    HOUSE_HOLDINGS,
    MARGIN_CALL_ANSWERS,
    ORIGIN,
    PRICES,
    PROFITS,
    REGULATOR,
    SECOND_ACCOUNT,
    SECOND_HOLDINGS,
    SILENCE_WINDOW_SECONDS,
)

__all__ = ["custodian_config", "cutoffs_after", "exchange_config", "regulator_config"]


def _party_files(party_id: str, role: str) -> dict[str, Any]:
    return {
        "party_id": party_id,
        "role": role,
        "listen": "127.0.0.1:0",
        "storage": {"path": f"{party_id}.sqlite"},
        "signing_key": f"keys/{party_id}.key.json",
        "key_registry": "keys/registry.json",
        "tls": {"ca": "pki/ca.pem", "cert": f"pki/{party_id}.pem", "key": f"pki/{party_id}.key"},
    }


def cutoffs_after(yield_time: time) -> tuple[time, time]:
    """Two cut-offs a day, 12 h apart, the first on the hour within an hour after the yield.

    The lifecycle's clock jump (to the yield time) then never passes a cut-off,
    so the first one the demo reaches is the first each party states.
    """
    first = (datetime.combine(datetime.now(UTC).date(), yield_time) + timedelta(hours=1)).replace(
        minute=0
    )
    return first.time(), (first + timedelta(hours=12)).time()


def _schedule(cutoffs: tuple[time, time]) -> str:
    return ",".join(moment.strftime("%H:%M") for moment in sorted(cutoffs))


def custodian_config(
    yield_time: time, regulator_address: str, cutoffs: tuple[time, time]
) -> dict[str, Any]:
    """The custodian's configuration file (paths relative to the demo directory)."""
    return {
        **_party_files(CUSTODIAN, "custodian"),
        "peers": {EXCHANGE: None, REGULATOR: regulator_address},
        # A heartbeat a second: the exchange tells a custodian that is down from a quiet one
        # within its policy's short staleness window (act 16).
        "sync": {"heartbeat_interval_ms": 1000},
        "custodian": {
            "log_origin": ORIGIN,
            "yield_time_utc": yield_time.strftime("%H:%M"),
            "accounts": [
                {"account_id": ACCOUNT, "client_id": CLIENT, "holdings": HOLDINGS},
                {"account_id": SECOND_ACCOUNT, "client_id": CLIENT, "holdings": SECOND_HOLDINGS},
                {"account_id": HOUSE_ACCOUNT, "client_id": EXCHANGE, "holdings": HOUSE_HOLDINGS},
            ],
            "margin_call_responses": MARGIN_CALL_ANSWERS,
            "reconciliation": {"cutoffs_utc": _schedule(cutoffs), "regulator": REGULATOR},
        },
    }


def exchange_config(
    custodian_address: str, regulator_address: str, cutoffs: tuple[time, time]
) -> dict[str, Any]:
    """The exchange's configuration file: it dials the custodian at ``custodian_address``."""
    return {
        **_party_files(EXCHANGE, "exchange"),
        # Two peers have addresses: which one is the custodian is said explicitly.
        "peers": {CUSTODIAN: custodian_address, REGULATOR: regulator_address},
        "exchange": {
            "custodian": CUSTODIAN,
            "log_origin": ORIGIN,
            "prices": [{"asset_id": asset, "price": price} for asset, price in PRICES.items()],
            "profits": PROFITS,
            "risk_policy": {"custodian_staleness_window_seconds": SILENCE_WINDOW_SECONDS},
            "reconciliation": {
                "cutoffs_utc": _schedule(cutoffs),
                "regulator": REGULATOR,
                "test_perturbations": [BREAK],
            },
        },
    }


def regulator_config(listen: str, custodian_address: str, exchange_address: str) -> dict[str, Any]:
    """The regulator's configuration file: it asks both parties for their position trees."""
    return {
        **_party_files(REGULATOR, "regulator"),
        # Fixed in advance: the custodian's and the exchange's files name it.
        "listen": listen,
        "peers": {CUSTODIAN: custodian_address, EXCHANGE: exchange_address},
    }
