"""The demo's scenario: its parties, what the client holds and pledges, and what the market does.

These are the inputs ``make demo`` starts from; every figure the servers derive
from them is read back from their signed statements, never computed here.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "ACCOUNT",
    "BREAK",
    "CLIENT",
    "CLIENT_TTL",
    "CUSTODIAN",
    "EXCHANGE",
    "EXPOSURE",
    "FIRST_DROP",
    "HOLDINGS",
    "HOUSE_ACCOUNT",
    "HOUSE_HOLDINGS",
    "MARGIN_CALL_ANSWERS",
    "OPERATOR",
    "ORIGIN",
    "PARTIES",
    "PATH_ID",
    "PATH_STEPS",
    "PATH_TTL",
    "PLEDGES",
    "PRICES",
    "PROCEEDS_ACCOUNT",
    "PROFITS",
    "REDEMPTION",
    "REGULATOR",
    "RELEASE",
    "RELEASE_EXPOSURE",
    "RELEASE_REFUSED",
    "SECOND_ACCOUNT",
    "SECOND_DROP",
    "SECOND_HOLDINGS",
    "SECOND_PLEDGE",
    "TOP_UP",
    "YIELD_LEAD",
]

CUSTODIAN = "custodian-1"
EXCHANGE = "exchange-1"
CLIENT = "client-1"
#: The demo's own TLS identity when it drives the servers' TestControlService.
OPERATOR = "demo-operator"
REGULATOR = "regulator-1"
#: Party id -> role, for `collateral-sync keygen`.
PARTIES = {CUSTODIAN: "custodian", EXCHANGE: "exchange", CLIENT: "client", REGULATOR: "regulator"}
ACCOUNT = "acct-7"
ORIGIN = f"{CUSTODIAN}/collateral-sync/attestations"
PATH_ID = f"path-{ACCOUNT}-1"
PROCEEDS_ACCOUNT = f"{EXCHANGE}-settlement"

# The scenario: what the client holds, pledges and authorises, and what the market does.
HOLDINGS = {"BTC": "8", "USDC": "120000", "BENJI": "100000", "TSLAx": "400"}
PLEDGES = (("BTC", "8"), ("USDC", "40000"), ("BENJI", "100000"), ("TSLAx", "400"))
TOP_UP = ("USDC", "40000")
#: Sell in this order, each step at most this much (asset, venue, max quantity).
PATH_STEPS = (
    ("USDC", "otc-desk", "120000"),
    ("BENJI", "fund-redemption", "100000"),
    ("BTC", "otc-desk", "8"),
    ("TSLAx", "broker", "400"),
)
PRICES = {"BTC": "60000", "USDC": "1", "BENJI": "1", "TSLAx": "250"}
EXPOSURE = "1000000"
FIRST_DROP = ("BTC", "45000")
SECOND_DROP = ("BTC", "20000")
#: How the custodian answers margin calls: the n-th call gets the n-th answer.
MARGIN_CALL_ANSWERS = [
    {"kind": "PARTIALLY_AGREE", "agreed_fraction": "0.5", "dispute_reason": "VALUATION"},
    {"kind": "AGREE"},
]
# The oversight acts: a second account of the client's, pledged after the liquidation.
SECOND_ACCOUNT = "acct-8"
SECOND_HOLDINGS = {"USDC": "250000"}
SECOND_PLEDGE = ("USDC", "150000")
#: The exchange's account at the custodian that settlements pay into and out of.
HOUSE_ACCOUNT = f"{EXCHANGE}/settlement"
HOUSE_HOLDINGS = {"USDC": "1000000"}
#: The exchange's realised trading result per account (negative: the client lost).
PROFITS = {SECOND_ACCOUNT: "-1500"}
#: Test mode only: from the second cut-off on, the exchange's view of one position is off.
BREAK = {
    "account_id": SECOND_ACCOUNT,
    "asset_id": "USDC",
    "field": "pledged_quantity",
    "delta": "25",
    "after_cutoffs": 1,
}
#: Act 15: acct-8's exposure, a release the policy refuses at it, and one it allows.
RELEASE_EXPOSURE = "150000"
RELEASE_REFUSED = ("USDC", "100000")
RELEASE = ("USDC", "48500")
#: After the release, the client redeems part of what acct-8 holds free (asset, quantity).
REDEMPTION = ("USDC", "200000")
#: The daily yield time is set this far after the start, so the clock jump stays short.
YIELD_LEAD = timedelta(minutes=10)
#: The exchange's custodian_staleness_window (§11.2): short, so act 16 waits it out.
SILENCE_WINDOW_SECONDS = 4

CLIENT_TTL = timedelta(hours=1)
#: A standing authorisation: it must still be fresh at the top-up.
PATH_TTL = timedelta(days=30)
