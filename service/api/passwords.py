"""Password hashes for the dashboard's users file: scrypt from the standard library, self-describing.

Why scrypt with its parameters in the string: a stolen users file must cost an attacker memory and time
per guess (scrypt is memory-hard, unlike a plain salted SHA-256), and a hash made today stays verifiable
if the parameters are raised later. Format: `scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from functools import cache

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # about 16 MiB and some 50 ms per hash on the project's machines
KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024**2, dklen=KEY_BYTES)


def hash_password(password: str) -> str:
    """A new salted hash of `password` for the users file."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = secrets.token_bytes(16)
    return "$".join((SCHEME, str(N), str(R), str(P), _b64(salt), _b64(_derive(password, salt, N, R, P))))


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; False for a wrong password or a malformed hash."""
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != SCHEME:
            return False
        derived = _derive(password, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(derived, base64.b64decode(expected))
    except (ValueError, TypeError, UnicodeError):
        return False


@cache
def dummy_hash() -> str:
    """Verified against when a user name is unknown, so a login takes as long for a name that exists as for
    one that does not (no probing for valid names by timing)."""
    return hash_password(secrets.token_hex(8))
