"""The kit's cases, by family; importing this package registers them with ``REGISTRY``.

Order of import is the order of a run: transport first (can we talk at all),
then requests that are not messages, the attestation log, signed-statement refusals, role behaviour
(then the pledge rules, which pledge the kit's account further),
liquidation (before position sync, whose equivocation case may leave a custodian wary of the kit's
exchange), position sync, settlement, and emergency release (last: an executed release consumes the
account's pledge), then the refresh of holdings statements (it moves the custodian's clock a
statement's lifetime ahead: of the custodian's cases only the evidence refusal, which no time
affects, follows it).
"""

from collateral_sync_conformance.cases import transport  # noqa: I001 (run order)
from collateral_sync_conformance.cases import request
from collateral_sync_conformance.cases import attestation, envelope, custodian
from collateral_sync_conformance.cases import pledge_rules, pledge_release
from collateral_sync_conformance.cases import access
from collateral_sync_conformance.cases import liquidation
from collateral_sync_conformance.cases import sync, exchange

from collateral_sync_conformance.cases import regulator, regulator_descent
from collateral_sync_conformance.cases import settlement, reconciliation
from collateral_sync_conformance.cases import cosign

# Last: an executed release consumes the account's pledge.
from collateral_sync_conformance.cases import emergency

# After every other custodian case: it moves the clock a statement's lifetime ahead.
from collateral_sync_conformance.cases import holdings_refresh

# Exchange cases with the kit as its custodian (--listen): they move the
# exchange's clock past due dates, and the last of sync_exchange ends its
# stream for good (equivocation), so nothing may follow them but the reading
# of the evidence the exchange kept of it. Equivocation evidence (evidence)
# comes before them: its checkpoint fork needs the stream. The freshness of what
# the exchange serves (exchange_served) follows the margin-call cases: it moves
# the exchange's clock a risk policy's lifetime ahead, past every price and
# holdings statement they value.
from collateral_sync_conformance.cases import exchange_holdings, exchange_margin_calls
from collateral_sync_conformance.cases import exchange_pledge_release, exchange_silence
from collateral_sync_conformance.cases import exchange_served
from collateral_sync_conformance.cases import evidence, sync_exchange

__all__ = [
    "access",
    "attestation",
    "cosign",
    "custodian",
    "emergency",
    "envelope",
    "evidence",
    "exchange",
    "exchange_holdings",
    "exchange_margin_calls",
    "exchange_pledge_release",
    "exchange_served",
    "exchange_silence",
    "holdings_refresh",
    "liquidation",
    "pledge_release",
    "pledge_rules",
    "reconciliation",
    "regulator",
    "regulator_descent",
    "request",
    "settlement",
    "sync",
    "sync_exchange",
    "transport",
]
