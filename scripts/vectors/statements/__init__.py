"""vectors/statements.json: signed statements that must verify, or must fail (§3).

Positive statements are issued through the SDK's own issuing path (threshold and
countersigned ones, and padded ones, are signed over PAE directly); negative ones are
built by hand (the SDK would refuse to issue them). Each names the verifier, the time
and the replay state, and the outcome written from the specification: the issuer and
the counted signer parties, or the ErrorReason and gRPC status.

Every type of the §3.5 table has at least one valid statement, realistic and fully
populated (_messages.py), and one refused for a reason of its type; the limits of
stages a and c (16 signatures, timestamps, 4 MiB) and the issuer rule of threshold
statements (§3.7 step 4) have their own. Payloads over 4 MiB go to "large_payloads",
written as a rule rather than as bytes.

The modules, by concern:

- assembly: statements_file, the order of the cases, each case written as a vector;
- _shared: the case record and the statements several modules build on (the holdings
  statement, the checkpoint, issuing through the SDK or forging by hand);
- envelope: single-signer statements, valid, and refused at stages a to d;
- threshold: the emergency releases of §3.7, their signature count and issuer rules;
- limits: timestamps and integers out of range (stage c);
- types_issued: the valid statements of the other §3.5 types;
- types_margin, types_settlement: per type, its valid vector and a refused one;
- large_payloads: payloads at and over 4 MiB.
"""

from __future__ import annotations

from .assembly import statements_file

__all__ = ["statements_file"]
