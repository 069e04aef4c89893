"""Person ids as the ledger keeps them: a keyed hash, never the id.

Person ids are often medical record numbers. A plain hash of one could be recomputed by anyone
who can list candidate ids, so the ledger stores HMAC-SHA256(secret, id), with a 32-byte secret
drawn from the OS on first use and kept in a file beside the ledger (``<ledger>.key``, mode 0600).
The ledger itself stores only an HMAC of a fixed text under the same secret, so that a missing or
different key file is refused rather than silently turning every known person into a new one
(which would reset their spent budget). Anyone holding both files can still test a guessed id:
keep the key with the ledger, on the machine that trains.
This module must not import torch or Ultralytics.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

_CHECK = b"ultralytics-dp ledger person key"


def key_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".key")


def load(ledger: Path, check: str | None) -> bytes:
    """The ledger's secret: created (with its check value returned by ``check_value``) when the
    ledger has none yet (``check`` None), else read and verified against ``check``."""
    path = key_path(ledger)
    if check is None and not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    if not path.is_file():
        raise ValueError(f"the ledger {ledger} tracks persons but its key file {path} is missing; restore it (without it "
                         "no person's spent budget can be found)")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) != 32 or (check is not None and not hmac.compare_digest(check_value(secret), check)):
        raise ValueError(f"{path} is not the key of the ledger {ledger}; restore the key file written with it")
    return secret


def check_value(secret: bytes) -> str:
    """What the ledger stores to recognise its key."""
    return hmac.new(secret, _CHECK, hashlib.sha256).hexdigest()


def person_key(secret: bytes, person: str) -> str:
    """The ledger's name for a person id."""
    return hmac.new(secret, person.encode("utf-8"), hashlib.sha256).hexdigest()
