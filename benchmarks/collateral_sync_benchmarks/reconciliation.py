"""``collateral-sync bench recon``: reconciliation of a million accounts, beside baselines.

Three processes, as in a deployment: the custodian and the exchange each run
in their own child process (spawned, so each one's peak RSS is its own) and
hold their positions in memory as plain tuples, about two assets an account;
this process is the regulator and reaches each party only through
``GetPositionTreeNodes`` requests and responses, serialised over a pipe.

Both parties get the same accounts with :data:`BREAK_SITES` breaks spread
evenly over the account-id space: quantities, locked and pledged quantities
that differ, accounts on one side only (each shifts every later leaf of that
side), assets on one side only. The exchange holds as many accounts as the
custodian, so only the offset-range method finds the breaks between the
missing accounts.

Timed, from the same start signal: both parties build their position tree,
totals and signed statement at once (wall time until both statements are in),
then the regulator verifies and compares the statements and locates every
break. The run fails (exit 1) unless the located breaks are exactly the
injected ones. Baselines from the same run:

* raw pymerkle: an ``InmemoryTree`` (pymerkle's in-memory tree, the fair
  match for a tree the party keeps in memory) over the custodian's leaf bytes,
  in a child process of its own, with the SDK hashing the same leaves; both
  roots must agree;
* the naive method: each party pickles all its positions, the regulator
  loads both dumps and diffs them account by account (a local pipe and
  pickle: cheaper than any real transport, so a generous baseline).

Memory is each party's peak RSS (``ru_maxrss``) over its whole life: its
positions, the build, the tree, serving the descent. Targets (brief §5):
statements, comparison and break location <= 10 s; <= 1 GiB RSS a party.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import pickle
import resource
import sys
import time
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from typing import Any

import pymerkle
from collateral_sync.amounts import format_amount
from collateral_sync.keys import KeyRegistry, SigningKey
from collateral_sync.merkle import leaf_hash
from collateral_sync.reconciliation import (
    PositionTree,
    PositionValues,
    build_reconciliation_statement,
    position_leaf,
    reconcile,
)
from collateral_sync.reconciliation._tree import _levels
from collateral_sync.signing import sign_statement, verify_statement
from collateral_sync.sync import CUSTODIAN_TO_EXCHANGE, EXCHANGE_TO_CUSTODIAN, LogHead
from collateral_sync.v1 import (
    common_pb2,
    envelope_pb2,
    reconciliation_pb2,
    reconciliation_service_pb2,
)

__all__ = ["run_recon_benchmark"]

FULL_ACCOUNTS = 1_000_000
BREAK_SITES = 100
TARGET_SECONDS = 10.0
TARGET_RSS_MIB = 1024.0

_ASSETS = ("BTC", "ETH", "MMF-USD", "SPY-TOKEN", "USDC")  # bytewise order
_CUTOFF = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
_ISSUED_AT = _CUTOFF + timedelta(minutes=1)
_REGULATOR = "regulator-1"
_ROLES = {"custodian": common_pb2.PARTY_ROLE_CUSTODIAN, "exchange": common_pb2.PARTY_ROLE_EXCHANGE}
_HEADS = {
    CUSTODIAN_TO_EXCHANGE: LogHead(812_345, bytes(range(32))),
    EXCHANGE_TO_CUSTODIAN: LogHead(40_321, bytes(range(32, 64))),
}
# What each tenth of the break sites changes on the exchange's side.
_KINDS = (
    "quantity",
    "quantity",
    "locked_quantity",
    "locked_quantity",
    "pledged_quantity",
    "pledged_quantity",
    "account only at the custodian",
    "account only at the exchange",
    "asset only at the custodian",
    "asset only at the exchange",
)
_Positions = dict[str, list[PositionValues]]


def _maxrss_mib() -> float:
    """Peak RSS of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    """Current RSS of this process (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _key(role: str) -> SigningKey:
    seed = bytes([1 if role == "custodian" else 2]) * 32
    return SigningKey.from_seed(seed, f"{role}-1", _ROLES[role])


# ------------------------------------------------------------------------- data


def _account_id(index: int) -> str:
    return f"client-{index:07d}"


def _base_positions(index: int) -> list[PositionValues]:
    """The custodian's positions of account ``index``: one to three assets, exact decimals."""
    count = 1 + (index * 2654435761 >> 7) % 3
    first = (index * 40503) % len(_ASSETS)
    picks = sorted({(first + 2 * j) % len(_ASSETS) for j in range(count)})
    positions = []
    for asset in picks:
        whole = (index * 7919 + asset * 104729) % 1_000_000
        quantity = f"{whole}.{(index + asset) % 9 + 1}"
        locked = "0" if (index + asset) % 11 else str(whole // 10)
        pledged = quantity if (index + asset) % 3 else str(whole // 2)
        positions.append((_ASSETS[asset], quantity, locked, pledged))
    return positions


def _sites(size: int, sites: int) -> list[tuple[int, str]]:
    """(account index, kind) of each break site, spread over the key space."""
    return [
        ((2 * k + 1) * size // (2 * sites) + (k * 37) % 5, _KINDS[k % len(_KINDS)])
        for k in range(sites)
    ]


def _plus_one(text: str) -> str:
    return format_amount(Decimal(text) + 1)


def _exchange_view(index: int, kind: str) -> dict[str, list[PositionValues]]:
    """The exchange's accounts at a break site (none, one, or the account and an extra)."""
    base = _base_positions(index)
    account_id = _account_id(index)
    field = {"quantity": 1, "locked_quantity": 2, "pledged_quantity": 3}.get(kind)
    if field is not None:
        changed = list(base[0])
        changed[field] = _plus_one(changed[field])
        return {account_id: [tuple(changed), *base[1:]]}  # type: ignore[list-item]
    if kind == "account only at the custodian":
        return {}
    if kind == "account only at the exchange":
        return {account_id: base, f"{account_id}-x": [("USDC", "5.5", "0", "5.5")]}
    if kind == "asset only at the custodian":
        return {account_id: base[1:]}
    held = {asset for asset, *_ in base}
    extra = next(asset for asset in _ASSETS if asset not in held)
    return {account_id: sorted([*base, (extra, "2.5", "0", "1")])}


def _positions(role: str, size: int, sites: int) -> _Positions:
    data = {_account_id(i): _base_positions(i) for i in range(size)}
    if role == "exchange":
        for index, kind in _sites(size, sites):
            del data[_account_id(index)]
            data.update(_exchange_view(index, kind))
        # Keep insertion order sorted, as a database index would give it.
        data = {account_id: data[account_id] for account_id in sorted(data)}
    return data


def _naive_diff(custodian: _Positions, exchange: _Positions) -> list[tuple[Any, ...]]:
    """Breaks found by comparing two full dumps, as (account, asset, field, c, e) tuples."""
    found: list[tuple[Any, ...]] = []
    for account_id, ours in custodian.items():
        theirs = exchange.get(account_id)
        if theirs is None:
            found += [(account_id, p[0], 4, p[1], None) for p in ours] or [
                (account_id, "", 4, "0", None)
            ]
        elif theirs != ours:
            mine = {p[0]: p for p in ours}
            other = {p[0]: p for p in theirs}
            for asset in sorted(mine.keys() | other.keys()):
                if asset not in other:
                    found.append((account_id, asset, 4, mine[asset][1], None))
                elif asset not in mine:
                    found.append((account_id, asset, 4, None, other[asset][1]))
                else:
                    found += [
                        (account_id, asset, field, mine[asset][field], other[asset][field])
                        for field in (1, 2, 3)
                        if mine[asset][field] != other[asset][field]
                    ]
    for account_id, theirs in exchange.items():
        if account_id not in custodian:
            found += [(account_id, p[0], 4, None, p[1]) for p in theirs] or [
                (account_id, "", 4, None, "0")
            ]
    found.sort(key=lambda b: (b[0].encode(), b[1].encode(), b[2]))
    return found


def _expected_breaks(size: int, sites: int) -> list[tuple[Any, ...]]:
    """The injected breaks, from the break sites alone (no full data)."""
    custodian: _Positions = {}
    exchange: _Positions = {}
    for index, kind in _sites(size, sites):
        custodian[_account_id(index)] = _base_positions(index)
        exchange.update(_exchange_view(index, kind))
    return _naive_diff(custodian, exchange)


def _as_tuples(breaks: tuple[reconciliation_pb2.ReconciliationBreak, ...]) -> list[tuple[Any, ...]]:
    return [
        (
            b.account_id,
            b.asset_id,
            b.field,
            b.custodian_value.value if b.HasField("custodian_value") else None,
            b.exchange_value.value if b.HasField("exchange_value") else None,
        )
        for b in breaks
    ]


# ---------------------------------------------------------------- child processes


def _party_main(role: str, size: int, sites: int, conn: Connection) -> None:
    """A party: hold positions, build and sign the statement on 'go', then serve the descent."""
    data = _positions(role, size, sites)
    gc.collect()
    conn.send(("ready", _rss_mib()))
    while (command := conn.recv()) != "stop":
        if command == "go":
            begin, cpu = time.perf_counter(), time.process_time()
            tree = PositionTree.build(data)
            statement = build_reconciliation_statement(
                tree, cutoff_time=_CUTOFF, party_role=_ROLES[role], sync_log_heads=_HEADS
            )
            envelope = sign_statement(
                statement,
                _key(role),
                audience=[_REGULATOR],
                sequence=1,
                ttl=timedelta(hours=1),
                issued_at=_ISSUED_AT,
            )
            elapsed = time.perf_counter() - begin
            conn.send(
                ("statement", envelope.SerializeToString(), elapsed, time.process_time() - cpu)
            )
            serve_cpu = time.process_time()
            while (request := conn.recv_bytes()) != b"done":
                parsed = reconciliation_service_pb2.GetPositionTreeNodesRequest.FromString(request)
                conn.send_bytes(tree.answer(parsed).SerializeToString())
            conn.send(("served", time.process_time() - serve_cpu, _maxrss_mib()))
        elif command == "dump":
            conn.send_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    conn.close()


def _pymerkle_main(size: int, conn: Connection) -> None:
    """Baseline: raw pymerkle over the custodian's leaf bytes, and the SDK on the same bytes."""
    leaves = [position_leaf(_account_id(i), _base_positions(i)) for i in range(size)]
    gc.collect()
    before = _rss_mib()
    begin = time.perf_counter()
    levels = _levels(b"".join(map(leaf_hash, leaves)))
    no_offsets = array("Q", bytes(8 * (len(leaves) + 1)))
    sdk_root = PositionTree(bytearray(), no_offsets, levels, ()).root
    sdk_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    tree.append_entries(leaves)
    raw_root = tree.get_root()
    raw_seconds = time.perf_counter() - begin
    conn.send((sdk_seconds, raw_seconds, sdk_root == raw_root, before, _rss_mib()))
    conn.close()


# ------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class _Row:
    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    note: str = ""

    def render(self) -> str:
        line = f"  {self.name:<44} {self.value:>12,.3f} {self.unit:<6}"
        if self.baseline is not None:
            ratio = self.value / self.baseline if self.baseline else float("nan")
            line += (
                f" | {self.baseline_name:<34} {self.baseline:>12,.3f} {self.unit:<6}"
                f" ratio {ratio:6.3f}"
            )
        return f"{line}  [{self.note}]" if self.note else line


class _PipeSource:
    """A party's GetPositionTreeNodes over its pipe; waits off the event loop thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def __call__(
        self, request: reconciliation_service_pb2.GetPositionTreeNodesRequest
    ) -> reconciliation_service_pb2.GetPositionTreeNodesResponse:
        self.conn.send_bytes(request.SerializeToString())
        answer = await asyncio.to_thread(self.conn.recv_bytes)
        return reconciliation_service_pb2.GetPositionTreeNodesResponse.FromString(answer)


def _expect(conn: Connection, tag: str) -> tuple[Any, ...]:
    message = conn.recv()
    if not (isinstance(message, tuple) and message[0] == tag):
        raise RuntimeError(f"expected {tag!r} from a party, got {message!r}")
    return message[1:]


def _verify(
    envelope_bytes: bytes, registry: KeyRegistry
) -> reconciliation_pb2.ReconciliationStatement:
    envelope = envelope_pb2.Envelope.FromString(envelope_bytes)
    verified = verify_statement(
        envelope,
        registry,
        expected_type=reconciliation_pb2.ReconciliationStatement,
        audience=_REGULATOR,
        now=_ISSUED_AT + timedelta(seconds=1),
    )
    return verified.message


def _run(size: int, sites: int) -> tuple[list[_Row], list[str]]:
    spawn = multiprocessing.get_context("spawn")
    pipes = {role: spawn.Pipe() for role in _ROLES}
    parties = {
        role: spawn.Process(target=_party_main, args=(role, size, sites, pipes[role][1]))
        for role in _ROLES
    }
    for process in parties.values():
        process.start()
    conns = {role: pipes[role][0] for role in _ROLES}
    data_rss = {role: _expect(conns[role], "ready")[0] for role in _ROLES}
    registry = KeyRegistry()
    for role in _ROLES:
        registry.add(_key(role).party_key(valid_from=_CUTOFF - timedelta(days=1)))
    expected = _expected_breaks(size, sites)
    gc.collect()

    begin = time.perf_counter()
    for conn in conns.values():
        conn.send("go")
    built = {role: _expect(conns[role], "statement") for role in _ROLES}
    statements_wall = time.perf_counter() - begin
    compare_begin = time.perf_counter()
    custodian = _verify(built["custodian"][0], registry)
    exchange = _verify(built["exchange"][0], registry)
    reconciliation = asyncio.run(
        reconcile(
            custodian, exchange, _PipeSource(conns["custodian"]), _PipeSource(conns["exchange"])
        )
    )
    located_seconds = time.perf_counter() - compare_begin
    total = time.perf_counter() - begin
    served = {}
    for role, conn in conns.items():
        conn.send_bytes(b"done")
        served[role] = _expect(conn, "served")

    if _as_tuples(reconciliation.breaks) != expected:
        raise RuntimeError(
            f"located breaks differ from the injected ones: {len(reconciliation.breaks)} "
            f"located, {len(expected)} injected"
        )
    location = reconciliation.location
    assert location is not None

    # Naive baseline: ship everything, diff everything.
    naive_begin = time.perf_counter()
    dumps = {}
    dumped_bytes = 0
    for role, conn in conns.items():
        conn.send("dump")
        raw = conn.recv_bytes()
        dumped_bytes += len(raw)
        dumps[role] = pickle.loads(raw)  # noqa: S301  # our own child's bytes
        del raw
    naive = _naive_diff(dumps["custodian"], dumps["exchange"])
    naive_seconds = time.perf_counter() - naive_begin
    del dumps
    if naive != expected:
        raise RuntimeError("the naive diff disagrees with the injected breaks")
    for conn in conns.values():
        conn.send("stop")
    for process in parties.values():
        process.join()

    baseline_parent, baseline_child = spawn.Pipe()
    baseline = spawn.Process(target=_pymerkle_main, args=(size, baseline_child))
    baseline.start()
    sdk_hash, raw_hash, roots_agree, pymerkle_before, pymerkle_rss = baseline_parent.recv()
    baseline.join()
    if not roots_agree:
        raise RuntimeError("pymerkle's root differs from the SDK's over the same leaves")

    requested_nodes = location.custodian.ranges + location.exchange.ranges
    requested_accounts = location.custodian.accounts + location.exchange.accounts
    rows = [
        _Row(
            "position tree hashing (same leaf bytes)",
            sdk_hash,
            "s",
            "raw pymerkle InmemoryTree + root",
            raw_hash,
        ),
        _Row(
            "custodian statement (tree, totals, sign)",
            built["custodian"][1],
            "s",
            note=f"cpu {built['custodian'][2]:.2f} s; builds at once with the exchange",
        ),
        _Row(
            "exchange statement (tree, totals, sign)",
            built["exchange"][1],
            "s",
            note=f"cpu {built['exchange'][2]:.2f} s",
        ),
        _Row("both statements in (wall)", statements_wall, "s"),
        _Row(
            "verify + compare + locate all breaks",
            located_seconds,
            "s",
            "naive: dump both, load, diff all",
            naive_seconds,
            note=(
                f"{location.rounds} rounds; serving cpu custodian {served['custodian'][0]:.2f} s,"
                f" exchange {served['exchange'][0]:.2f} s"
            ),
        ),
        _Row(
            "total: statements + compare + locate",
            total,
            "s",
            note=f"target <= {TARGET_SECONDS:.0f} s",
        ),
        _Row(
            "node hashes + accounts asked, both sides",
            requested_nodes + requested_accounts,
            "items",
            "naive: accounts shipped",
            2 * size,
            note=(
                f"custodian {location.custodian.ranges:,} ranges + "
                f"{location.custodian.accounts:,} accounts in {location.custodian.calls} calls; "
                f"exchange {location.exchange.ranges:,} + {location.exchange.accounts:,} in "
                f"{location.exchange.calls}; naive dumps {dumped_bytes / 2**20:,.0f} MiB"
            ),
        ),
        _Row(
            "peak RSS custodian process",
            served["custodian"][1],
            "MiB",
            note=(
                f"positions alone {data_rss['custodian']:,.0f} MiB; "
                f"target <= {TARGET_RSS_MIB:,.0f} MiB"
            ),
        ),
        _Row(
            "peak RSS exchange process",
            served["exchange"][1],
            "MiB",
            note=f"positions alone {data_rss['exchange']:,.0f} MiB",
        ),
        _Row(
            "custodian RSS beyond its positions",
            served["custodian"][1] - data_rss["custodian"],
            "MiB",
            "pymerkle InmemoryTree, same leaves",
            pymerkle_rss - pymerkle_before,
            note=(
                "SDK: peak over build, tree and serving; pymerkle: RSS growth "
                f"over its {pymerkle_before:,.0f} MiB of leaf bytes"
            ),
        ),
    ]
    summary = [
        f"breaks: {sites} sites ({', '.join(sorted(set(_KINDS)))}), "
        f"{len(reconciliation.breaks)} ReconciliationBreak entries, all located and as injected",
    ]
    return rows, summary


def run_recon_benchmark(*, scale: float = 1.0) -> int:
    """Run the reconciliation suite and print its table; returns the process exit code."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale: expected 0 < scale <= 1, got {scale}")
    size = max(200, int(FULL_ACCOUNTS * scale))
    sites = min(BREAK_SITES, size // 20)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"collateral-sync bench recon  (cpu count {os.cpu_count()}, scale {scale}, "
        f"load average {load})"
    )
    print(
        f"{size:,} accounts a party, {sites} break sites; custodian, exchange and regulator "
        f"in three processes, GetPositionTreeNodes over pipes"
    )
    try:
        rows, summary = _run(size, sites)
    except (RuntimeError, OSError, EOFError) as err:
        print(f"collateral-sync bench recon: run failed: {err}", file=sys.stderr)
        return 1
    for row in rows:
        print(row.render())
    for line in summary:
        print(f"  {line}")
    return 0
