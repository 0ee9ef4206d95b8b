"""Password hashing (scrypt, stdlib) and verification for [[users]]."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """'scrypt$N$r$p$salt$hash' with base64 fields; the format 'password_hash' expects."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_N}${_R}${_P}${b64(salt)}${b64(digest)}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise ValueError("malformed scrypt hash") from e
    if n < 2 or n & (n - 1) or not (1 <= r <= 32 and 1 <= p <= 16) or len(digest) < 16:
        raise ValueError("implausible scrypt parameters")
    return n, r, p, salt, digest


def verify_password(password: str, *, plain: str = "", encoded: str = "") -> bool:
    """Constant-time check against either a plain config password or a scrypt hash."""
    if encoded:
        n, r, p, salt, digest = parse_hash(encoded)
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest),
                                   maxmem=256 * 1024 * 1024)
        return hmac.compare_digest(candidate, digest)
    if plain:
        return hmac.compare_digest(password.encode(), plain.encode())
    return False
