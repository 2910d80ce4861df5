"""The custodian's and the exchange's side of reconciliation (docs/PROTOCOL.md §10.1-10.4).

At each cut-off (``ReconciliationSchedule``: offsets from 00:00 UTC, 00:00 and
12:00 by default) a party freezes its view — per account pledged to the
exchange, the positions of the latest holdings statement issued at or before
the cut-off (the custodian: those it issued; the exchange: those it received
and did not reject), and both sync-log heads — stores that snapshot, signs a
``ReconciliationStatement`` over it once, and submits it to the regulator.
``ReconciliationService`` answers from the stored snapshot only, so
``GetPositionTreeNodes`` keeps matching the signed root whatever happens
after the cut-off; it answers the regulator and the counterparty, nobody else
(PERMISSION_DENIED). A test or the demo triggers a cut-off "now" by moving the
test clocks past the next one (``TestControlService.AdvanceClock``): the
statement is frozen before AdvanceClock answers, then submitted. The same
service lists the equivocation evidence the party keeps
(``ListEquivocationEvidence``, §10.7), to regulators only: that is
:mod:`collateral_sync_reference.common.evidence`'s.

Configuration (inside the role's section, every key optional)::

    "reconciliation": {
      "cutoffs_utc": "00:00,12:00",
      "regulator": "regulator-1",
      "statement_ttl_seconds": 604800,
      "test_perturbations": [
        {"account_id": "acct-2", "asset_id": "BTC", "field": "locked_quantity", "delta": "1"},
        {"account_id": "acct-4", "field": "missing", "after_cutoffs": 1},
        {"account_id": "acct-5", "asset_id": "USDC", "field": "missing"}
      ]
    }

``regulator`` defaults to the one peer whose registered keys have the regulator
role; its address in ``peers`` is where statements are submitted (no address:
they are only served). ``test_perturbations`` changes this party's *view* at
each cut-off (one position field by ``delta``; an asset, or with no
``asset_id`` the whole account, left out) once ``after_cutoffs`` statements
(default 0) have been built, so tests and the demo can produce breaks, after a
matched cut-off if they like; a server refuses to start with them unless it
runs in test mode.

Sync-log heads are those of §10.2, whenever the statement is built: for each
direction, the last entry contained in a batch issued at or before the
cut-off (``SyncLog.heads_at``: the batches this party sent, as recorded when
they were sent, and the peer's batches as stored), not the heads held at that
moment — a batch the counterparty issued after the cut-off may already have
arrived (its clock runs ahead, or the statement is built late).

The exchange builds its statement for a cut-off ``C`` only once its sync
session has received a batch or heartbeat the custodian issued after ``C``
(§10.2; ``heard_after``, the session's ``peer_issued_at``): the stream is
ordered, so every custodian batch issued at or before ``C`` — one still in
flight at ``C`` too — is stored by then. Until it has, the cut-off waits
(logged once): the background task re-checks every
:data:`_HEARD_POLL_SECONDS`, ``AdvanceClock`` does not wait for it, and
``GetReconciliationStatement`` answers FAILED_PRECONDITION ``STATE_CONFLICT``.
There is no deadline: a custodian that stays silent (down) leaves the cut-off,
and the later ones, unstated until it is heard again — never built early. The
custodian builds as its clock reaches ``C``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import grpc.aio
from collateral_sync.amounts import format_amount, parse_amount
from collateral_sync.clients import RegulatorClient
from collateral_sync.errors import (
    CollateralSyncError,
    MalformedError,
    RPCError,
    StateError,
    VerificationError,
)
from collateral_sync.keys import KeyRegistry
from collateral_sync.reconciliation import (
    PositionTree,
    build_reconciliation_statement,
    cutoff_id_of,
)
from collateral_sync.signer import Signer
from collateral_sync.signing import sign_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN
from collateral_sync.transport import (
    ReloadableTls,
    TlsConfig,
    peer_party_id,
    plaintext_channel_for_testing,
    secure_channel,
)
from collateral_sync.v1 import (
    attestation_pb2,
    common_pb2,
    envelope_pb2,
    errors_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
    reconciliation_service_pb2_grpc,
    regulator_service_pb2,
)

from collateral_sync_reference.common.clock import Clock
from collateral_sync_reference.common.config import ConfigSection, ServerConfig
from collateral_sync_reference.common.evidence import KeptEvidence
from collateral_sync_reference.common.storage import SqlStorage

__all__ = [
    "DEFAULT_CUTOFFS",
    "PartyReconciliation",
    "Perturbation",
    "ReconciliationServicer",
    "ReconciliationSettings",
    "custodian_holdings",
    "cutoffs_between",
    "exchange_holdings",
    "parse_cutoff_id",
    "parse_reconciliation_settings",
]

_R = errors_pb2.ErrorReason
#: 00:00 and 12:00 UTC (§10.1).
DEFAULT_CUTOFFS: tuple[timedelta, ...] = (timedelta(0), timedelta(hours=12))
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_CUTOFF_ID = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_FIELDS = ("quantity", "locked_quantity", "pledged_quantity")
_STATEMENT_TYPE = "application/vnd.collateral-sync.v1.reconciliation-statement+proto"
#: Trees kept in memory; older cut-offs are rebuilt from their stored snapshot.
_TREE_CACHE = 4
#: Retry delay of a submission the regulator did not take.
_RETRY_SECONDS = 1.0
_MAX_SLEEP = 60.0
#: How often a cut-off waiting for the counterparty's frame issued after it is re-checked.
_HEARD_POLL_SECONDS = 0.25

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS reconciliation_statements (
        cutoff_id TEXT PRIMARY KEY,
        cutoff_us INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        submitted INTEGER NOT NULL DEFAULT 0
    )""",
    # The frozen view of each cut-off: one AccountPositions per account.
    """CREATE TABLE IF NOT EXISTS reconciliation_positions (
        cutoff_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        positions BLOB NOT NULL,
        PRIMARY KEY (cutoff_id, account_id)
    ) WITHOUT ROWID""",
)
_LAST_CUTOFF_KEY = "reconciliation_last_cutoff"


@dataclass(frozen=True, slots=True)
class Perturbation:
    """A test-mode change of this party's view: one field by ``delta``, or an asset or account left out."""

    account_id: str
    #: Empty with "missing": the whole account is left out.
    asset_id: str
    #: "quantity", "locked_quantity", "pledged_quantity" or "missing".
    field: str
    delta: Decimal
    #: Applies once this many statements have been built before.
    after_cutoffs: int = 0


@dataclass(frozen=True, slots=True)
class ReconciliationSettings:
    cutoffs: tuple[timedelta, ...]
    regulator_id: str | None
    regulator_address: str | None
    statement_ttl: timedelta
    perturbations: tuple[Perturbation, ...]


def _parse_perturbation(item: ConfigSection) -> Perturbation:
    field = item.string("field")
    if field not in (*_FIELDS, "missing"):
        raise item.error("field", "quantity|locked_quantity|pledged_quantity|missing", field)
    perturbation = Perturbation(
        account_id=item.string("account_id"),
        asset_id=item.string("asset_id") if "asset_id" in item else "",
        field=field,
        delta=Decimal(0) if field == "missing" else item.amount("delta"),
        after_cutoffs=item.integer("after_cutoffs", 0, minimum=0, maximum=1_000_000),
    )
    if field != "missing" and not perturbation.asset_id:
        raise item.error("asset_id", "the asset whose field changes", "nothing")
    item.finish()
    return perturbation


def parse_reconciliation_settings(
    config: ServerConfig, registry: KeyRegistry | None = None
) -> ReconciliationSettings:
    """Read the ``reconciliation`` object of the role's section (see the module docstring).

    Without ``registry`` (the check before start) the default regulator is not
    looked up.
    """
    section = config.role_settings.section("reconciliation")
    cutoffs: list[timedelta] = []
    raw = section.string("cutoffs_utc", "00:00,12:00")
    for text in raw.split(","):
        match = _TIME.fullmatch(text.strip())
        if match is None:
            raise section.error("cutoffs_utc", "HH:MM[,HH:MM...] (UTC, 24-hour)", raw)
        cutoffs.append(timedelta(hours=int(match[1]), minutes=int(match[2])))
    if not cutoffs or len(set(cutoffs)) != len(cutoffs):
        raise section.error("cutoffs_utc", "at least one time, each once", raw)
    regulator: str | None = section.string("regulator") if "regulator" in section else None
    if regulator is None and registry is not None:
        found = sorted(
            peer
            for peer in config.peers
            if any(k.role == common_pb2.PARTY_ROLE_REGULATOR for k in registry.keys_for(peer))
        )
        regulator = found[0] if len(found) == 1 else None
    if regulator is not None and regulator not in config.peers and "regulator" in section:
        raise section.error(
            "regulator", f"a party named in peers ({sorted(config.peers)})", regulator
        )
    settings = ReconciliationSettings(
        cutoffs=tuple(sorted(cutoffs)),
        regulator_id=regulator,
        regulator_address=None if regulator is None else config.peers.get(regulator),
        statement_ttl=section.seconds("statement_ttl_seconds", 7 * 86_400),
        perturbations=tuple(
            _parse_perturbation(item) for item in section.sections("test_perturbations")
        ),
    )
    section.finish()
    return settings


def parse_cutoff_id(cutoff_id: str, cutoffs: Sequence[timedelta]) -> datetime:
    """The time of a scheduled cut-off named by ``cutoff_id``, or MalformedError."""
    moment: datetime | None = None
    if _CUTOFF_ID.fullmatch(cutoff_id):
        with contextlib.suppress(ValueError):
            moment = datetime.strptime(cutoff_id, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    if moment is None:
        raise MalformedError(
            f"cutoff_id: expected RFC 3339 UTC like 2026-11-23T12:00:00Z, got {cutoff_id!r}",
            metadata={
                "field": "cutoff_id",
                "expected": "YYYY-MM-DDTHH:MM:SSZ",
                "actual": cutoff_id,
            },
            field_violations={"cutoff_id": "not an RFC 3339 UTC time"},
        )
    offset = moment - datetime.combine(moment.date(), time(0), tzinfo=UTC)
    if offset not in cutoffs:
        expected = "|".join(str(c) for c in cutoffs)
        raise MalformedError(
            f"cutoff_id {cutoff_id!r} is not a scheduled cut-off: expected a time of day in "
            f"{expected}, got {offset}",
            metadata={"field": "cutoff_id", "expected": expected, "actual": str(offset)},
            field_violations={"cutoff_id": "not a scheduled cut-off"},
        )
    return moment


def cutoffs_between(
    after: datetime, until: datetime, cutoffs: Sequence[timedelta]
) -> list[datetime]:
    """Scheduled cut-offs ``c`` with ``after < c <= until``, oldest first."""
    found: list[datetime] = []
    day = datetime.combine(after.astimezone(UTC).date(), time(0), tzinfo=UTC)
    while day <= until:
        found.extend(c for c in (day + o for o in cutoffs) if after < c <= until)
        day += timedelta(days=1)
    return found


def _latest_cutoff(now: datetime, cutoffs: Sequence[timedelta]) -> datetime:
    day = datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)
    candidates = [day + o for o in cutoffs if day + o <= now]
    return max(candidates) if candidates else day - timedelta(days=1) + max(cutoffs)


def _to_us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


class PartyReconciliation:
    """One party's cut-offs: frozen views, signed statements, submissions, tree answers."""

    def __init__(
        self,
        *,
        storage: SqlStorage,
        signer: Signer,
        clock: Clock,
        settings: ReconciliationSettings,
        counterparty_id: str | None,
        exchange_id: str,
        holdings: Callable[[], Iterable[envelope_pb2.Envelope]],
        tls: TlsConfig | ReloadableTls | None,
        test_mode: bool,
        logger: logging.Logger,
        on_submitted: Callable[[str], None] | None = None,
        heard_after: Callable[[], datetime | None] | None = None,
    ) -> None:
        if settings.perturbations and not test_mode:
            raise MalformedError(
                "reconciliation.test_perturbations is only allowed in test mode",
                metadata={
                    "field": "reconciliation.test_perturbations",
                    "expected": "absent (production)",
                    "actual": str(len(settings.perturbations)),
                },
            )
        self._storage = storage
        self._db = storage.connection
        self._signer = signer
        self._clock = clock
        self._settings = settings
        self._exchange_id = exchange_id
        self._holdings = holdings
        self._tls = tls
        self._counterparty_id = counterparty_id
        self._logger = logger
        self._on_submitted = on_submitted
        # The exchange: the latest issued_at/sent_at of a frame received from the
        # counterparty; a cut-off is built once it is after it (§10.2). None (the
        # custodian): built as the clock reaches the cut-off.
        self._heard_after = heard_after
        #: The cut-off whose wait for the counterparty was last logged.
        self._waiting_logged: str | None = None
        self._role = signer.role
        sending = (
            CUSTODIAN_TO_EXCHANGE
            if self._role == common_pb2.PARTY_ROLE_CUSTODIAN
            else (EXCHANGE_TO_CUSTODIAN)
        )
        # No single counterparty (e.g. a custodian serving several exchanges): no statements.
        self._log = (
            None
            if counterparty_id is None
            else storage.sync_log(
                party_id=signer.party_id, peer_party_id=counterparty_id, sending_direction=sending
            )
        )
        self._trees: dict[str, PositionTree] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        storage.execute_schema("reconciliation", _SCHEMA)
        if storage.get_meta(_LAST_CUTOFF_KEY) is None:
            # Cut-offs before the first start are not ours to state.
            latest = _latest_cutoff(clock.now(), settings.cutoffs)
            with storage.transaction():
                storage.set_meta(_LAST_CUTOFF_KEY, cutoff_id_of(latest))

    # --- building

    def run_due(self) -> list[str]:
        """Freeze and sign every cut-off the clock has reached; return their ids."""
        if self._settings.regulator_id is None or self._log is None:
            return []
        last_id = self._storage.get_meta(_LAST_CUTOFF_KEY)
        assert last_id is not None
        last = parse_cutoff_id(last_id, self._settings.cutoffs)
        due = cutoffs_between(last, self._clock.now(), self._settings.cutoffs)
        built = []
        for cutoff in due:
            if not self._heard(cutoff):
                # Later cut-offs wait too: nothing issued after this one has arrived.
                self._log_waiting(cutoff)
                break
            self._ensure(cutoff)
            built.append(cutoff_id_of(cutoff))
        if built:
            with self._storage.transaction():
                self._storage.set_meta(_LAST_CUTOFF_KEY, built[-1])
            self._wake.set()
        return built

    def _waiting(self) -> bool:
        """Whether a cut-off the clock has reached is waiting for the counterparty (§10.2)."""
        if self._heard_after is None or self._settings.regulator_id is None or self._log is None:
            return False
        last_id = self._storage.get_meta(_LAST_CUTOFF_KEY)
        assert last_id is not None
        last = parse_cutoff_id(last_id, self._settings.cutoffs)
        return bool(cutoffs_between(last, self._clock.now(), self._settings.cutoffs))

    def _heard(self, cutoff: datetime) -> bool:
        """Whether a statement for ``cutoff`` may be built now (§10.2)."""
        if self._heard_after is None:
            return True
        heard = self._heard_after()
        return heard is not None and heard > cutoff

    def _log_waiting(self, cutoff: datetime) -> None:
        """Log a cut-off's wait once, and have the background task re-check it from now on."""
        cutoff_id = cutoff_id_of(cutoff)
        if self._waiting_logged == cutoff_id:
            return
        self._waiting_logged = cutoff_id
        self._wake.set()
        heard = self._heard_after() if self._heard_after is not None else None
        self._logger.info(
            "reconciliation statement for %s waits for a batch or heartbeat %s issued after "
            "it (latest received: %s)",
            cutoff_id,
            self._counterparty_id,
            "none" if heard is None else heard.isoformat(),
        )

    def _view(self, cutoff: datetime) -> dict[str, list[common_pb2.Position]]:
        latest: dict[str, attestation_pb2.HoldingsStatement] = {}
        for envelope in self._holdings():
            statement = attestation_pb2.HoldingsStatement.FromString(envelope.payload)
            if statement.header.issued_at.ToDatetime(tzinfo=UTC) > cutoff:
                continue
            seen = latest.get(statement.account_id)
            if seen is None or statement.epoch > seen.epoch:
                latest[statement.account_id] = statement
        view = {
            account_id: [_copy(p) for p in statement.positions]
            for account_id, statement in latest.items()
            if statement.exchange_id == self._exchange_id
        }
        if self._settings.perturbations:
            built = self._db.execute("SELECT COUNT(*) FROM reconciliation_statements").fetchone()
            for change in self._settings.perturbations:
                if built[0] >= change.after_cutoffs:
                    self._perturb(view, change)
        return view

    @staticmethod
    def _perturb(view: dict[str, list[common_pb2.Position]], change: Perturbation) -> None:
        positions = view.get(change.account_id)
        if positions is None:
            return
        if change.field == "missing":
            if change.asset_id:
                positions[:] = [p for p in positions if p.asset_id != change.asset_id]
            else:
                del view[change.account_id]
            return
        for position in positions:
            if position.asset_id == change.asset_id:
                target = getattr(position, change.field)
                value = parse_amount(target.value) + change.delta
                target.value = format_amount(max(value, Decimal(0)))

    def _stored(self, cutoff_id: str) -> envelope_pb2.Envelope | None:
        row = self._db.execute(
            "SELECT envelope FROM reconciliation_statements WHERE cutoff_id = ?", (cutoff_id,)
        ).fetchone()
        return None if row is None else envelope_pb2.Envelope.FromString(row[0])

    def _ensure(self, cutoff: datetime) -> envelope_pb2.Envelope:
        cutoff_id = cutoff_id_of(cutoff)
        stored = self._stored(cutoff_id)
        if stored is not None:
            return stored
        if self._settings.regulator_id is None or self._log is None:
            raise StateError(
                "reconciliation needs one regulator and one counterparty: expected "
                "reconciliation.regulator and a single exchange, got "
                f"regulator {self._settings.regulator_id!r}",
                metadata={"expected": "regulator and counterparty", "actual": "not configured"},
            )
        view = self._view(cutoff)
        tree = PositionTree.build(view)
        statement = build_reconciliation_statement(
            tree,
            cutoff_time=cutoff,
            party_role=self._role,
            sync_log_heads=self._log.heads_at(cutoff),
        )
        rows = [
            (
                cutoff_id,
                account_id,
                reconciliation_pb2.AccountPositions(
                    account_id=account_id, positions=positions
                ).SerializeToString(deterministic=True),
            )
            for account_id, positions in view.items()
        ]
        now = self._clock.now()
        with self._storage.transaction():
            envelope = sign_statement(
                statement,
                self._signer,
                audience=[self._settings.regulator_id],
                sequence=self._storage.next_sequence(_STATEMENT_TYPE),
                ttl=self._settings.statement_ttl,
                issued_at=now,
                statement_id=f"{self._signer.party_id}/reconciliation/{cutoff_id}",
            )
            self._db.executemany("INSERT INTO reconciliation_positions VALUES (?, ?, ?)", rows)
            self._db.execute(
                "INSERT INTO reconciliation_statements (cutoff_id, cutoff_us, envelope) "
                "VALUES (?, ?, ?)",
                (cutoff_id, _to_us(cutoff), envelope.SerializeToString()),
            )
        self._remember(cutoff_id, tree)
        self._logger.info(
            "reconciliation statement for %s: %d accounts, root %s",
            cutoff_id,
            tree.size,
            tree.root.hex()[:16],
        )
        return envelope

    def _remember(self, cutoff_id: str, tree: PositionTree) -> None:
        self._trees[cutoff_id] = tree
        while len(self._trees) > _TREE_CACHE:
            del self._trees[next(iter(self._trees))]

    # --- serving

    def statement(self, cutoff_id: str) -> envelope_pb2.Envelope:
        """The signed statement of a cut-off, built once (STATE_CONFLICT before it)."""
        cutoff = parse_cutoff_id(cutoff_id, self._settings.cutoffs)
        now = self._clock.now()
        if cutoff > now:
            raise StateError(
                f"cut-off {cutoff_id} has not been reached: expected a cut-off at or before "
                f"{cutoff_id_of(now.replace(microsecond=0))}, got {cutoff_id}",
                metadata={"expected": f"<= {now.isoformat()}", "actual": cutoff_id},
            )
        if not self._heard(cutoff) and self._stored(cutoff_id) is None:
            heard = self._heard_after() if self._heard_after is not None else None
            raise StateError(
                f"cut-off {cutoff_id} is not stated yet: expected a batch or heartbeat "
                f"{self._counterparty_id} issued after it (PROTOCOL.md §10.2), got "
                f"{'none' if heard is None else 'the latest issued ' + heard.isoformat()}",
                metadata={
                    "expected": f"a frame issued after {cutoff_id}",
                    "actual": "none" if heard is None else heard.isoformat(),
                },
            )
        return self._ensure(cutoff)

    def _tree(self, cutoff_id: str) -> PositionTree:
        tree = self._trees.get(cutoff_id)
        if tree is not None:
            return tree
        parse_cutoff_id(cutoff_id, self._settings.cutoffs)
        if (
            self._db.execute(
                "SELECT 1 FROM reconciliation_statements WHERE cutoff_id = ?", (cutoff_id,)
            ).fetchone()
            is None
        ):
            raise StateError(
                f"no reconciliation statement for cut-off {cutoff_id}: expected one built by "
                "GetReconciliationStatement, got none",
                reason=_R.ERROR_REASON_NOT_FOUND,
                metadata={"expected": "a built statement", "actual": cutoff_id},
            )
        rows = self._db.execute(
            "SELECT account_id, positions FROM reconciliation_positions WHERE cutoff_id = ? "
            "ORDER BY account_id",
            (cutoff_id,),
        )
        tree = PositionTree.build(
            (account_id, reconciliation_pb2.AccountPositions.FromString(data).positions)
            for account_id, data in rows
        )
        self._remember(cutoff_id, tree)
        return tree

    def check_reader(self, context: grpc.aio.ServicerContext) -> None:
        """Only the regulator and the counterparty read a party's positions (PERMISSION_DENIED)."""
        if self._tls is None:
            return  # plaintext (tests only): no identities to tell apart
        allowed = sorted(
            p for p in (self._settings.regulator_id, self._counterparty_id) if p is not None
        )
        peer = peer_party_id(context) or ""
        if peer not in allowed:
            raise VerificationError(
                f"reconciliation data is for {'|'.join(allowed) or 'nobody'}, not {peer!r}",
                reason=_R.ERROR_REASON_KEY_ROLE_MISMATCH,
                metadata={"expected": "|".join(allowed), "actual": peer},
            )

    def tree_nodes(
        self, request: reconciliation_service_pb2.GetPositionTreeNodesRequest
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        return self._tree(request.cutoff_id).answer(request)

    # --- submitting

    def start(self) -> None:
        self.run_due()
        self._task = asyncio.create_task(self._submit_forever(), name="reconciliation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def _next_cutoff(self) -> datetime:
        now = self._clock.now()
        upcoming = cutoffs_between(now, now + timedelta(days=1), self._settings.cutoffs)
        return upcoming[0]

    async def _submit_forever(self) -> None:
        address = self._settings.regulator_address
        channel: grpc.aio.Channel | None = None
        if address is not None:
            channel = (
                plaintext_channel_for_testing(address)
                if self._tls is None
                else secure_channel(address, self._tls)
            )
        try:
            client = None if channel is None else RegulatorClient(channel)
            while True:
                pending = False
                try:
                    self.run_due()
                    if client is not None:
                        pending = not await self._submit_pending(client)
                except CollateralSyncError as err:
                    self._logger.warning(
                        "reconciliation failed: %s: %s", err.reason_name, err.message
                    )
                    pending = True
                wait = (self._next_cutoff() - self._clock.now()).total_seconds()
                if pending:
                    wait = min(wait, _RETRY_SECONDS)
                if self._waiting():
                    wait = min(wait, _HEARD_POLL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(max(wait, 0.05), _MAX_SLEEP)):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if channel is not None:
                await channel.close()

    async def _submit_pending(self, client: RegulatorClient) -> bool:
        """Submit every statement the regulator has not taken; True when none is left."""
        rows = self._db.execute(
            "SELECT cutoff_id, envelope FROM reconciliation_statements WHERE submitted = 0 "
            "ORDER BY cutoff_us"
        ).fetchall()
        done = True
        for cutoff_id, data in rows:
            envelope = envelope_pb2.Envelope.FromString(data)
            try:
                await client.submit_reconciliation_statement(
                    regulator_service_pb2.SubmitReconciliationStatementRequest(
                        reconciliation_statement=envelope
                    )
                )
            except RPCError as err:
                if err.reason != _R.ERROR_REASON_REPLAYED:
                    self._logger.warning(
                        "regulator refused the statement for %s: %s: %s",
                        cutoff_id,
                        err.reason_name,
                        err.message,
                    )
                    # Refusals that will not change (forged, misaddressed) are not retried forever.
                    if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        done = False
                        continue
            with self._storage.transaction():
                self._db.execute(
                    "UPDATE reconciliation_statements SET submitted = 1 WHERE cutoff_id = ?",
                    (cutoff_id,),
                )
            self._logger.info("reconciliation statement for %s submitted", cutoff_id)
            if self._on_submitted is not None:
                self._on_submitted(cutoff_id)
        return done

    def submitted_statements(self) -> list[tuple[str, envelope_pb2.Envelope]]:
        """(cutoff_id, own signed statement) of every cut-off handed to the regulator, oldest first."""
        rows = self._db.execute(
            "SELECT cutoff_id, envelope FROM reconciliation_statements WHERE submitted = 1 "
            "ORDER BY cutoff_us"
        ).fetchall()
        return [(cutoff_id, envelope_pb2.Envelope.FromString(data)) for cutoff_id, data in rows]


def custodian_holdings(storage: SqlStorage) -> list[envelope_pb2.Envelope]:
    """Every holdings statement the custodian issued (its attestation log, orphans aside)."""
    rows = storage.connection.execute(
        "SELECT envelope FROM custodian_statements WHERE orphan = 0 ORDER BY leaf_index"
    )
    return [envelope_pb2.Envelope.FromString(row[0]) for row in rows]


def exchange_holdings(storage: SqlStorage) -> list[envelope_pb2.Envelope]:
    """Every holdings statement the exchange received on the stream and did not reject."""
    rows = storage.connection.execute(
        "SELECT envelope FROM exchange_holdings WHERE status != 'rejected' ORDER BY id"
    )
    return [envelope_pb2.Envelope.FromString(row[0]) for row in rows]


def _copy(position: common_pb2.Position) -> common_pb2.Position:
    # A copy: perturbations must not touch the parsed statement.
    copied = common_pb2.Position()
    copied.CopyFrom(position)
    return copied


class ReconciliationServicer(reconciliation_service_pb2_grpc.ReconciliationServiceServicer):
    """``ReconciliationService`` over a :class:`PartyReconciliation` and the party's kept evidence."""

    def __init__(self, reconciliation: PartyReconciliation, evidence: KeptEvidence) -> None:
        self._reconciliation = reconciliation
        self._evidence = evidence

    async def GetReconciliationStatement(
        self,
        request: reconciliation_service_pb2.GetReconciliationStatementRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.GetReconciliationStatementResponse:
        self._reconciliation.check_reader(context)
        return reconciliation_service_pb2.GetReconciliationStatementResponse(
            reconciliation_statement=self._reconciliation.statement(request.cutoff_id)
        )

    async def GetPositionTreeNodes(
        self,
        request: reconciliation_service_pb2.GetPositionTreeNodesRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        self._reconciliation.check_reader(context)
        return self._reconciliation.tree_nodes(request)

    async def ListEquivocationEvidence(
        self,
        request: reconciliation_service_pb2.ListEquivocationEvidenceRequest,
        context: grpc.aio.ServicerContext,
    ) -> reconciliation_service_pb2.ListEquivocationEvidenceResponse:
        self._evidence.check_reader(context)
        return self._evidence.page(request)
