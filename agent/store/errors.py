"""Errors the gateway raises; each front end maps them to its protocol's replies."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class; `reason` is a short, admin-readable explanation."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path, self.reason = path, reason or self.__class__.__doc__ or ""
        super().__init__(f"{path}: {self.reason}")


class NotFound(GatewayError):
    """no such file or directory"""


class AlreadyExists(GatewayError):
    """already exists"""


class IsADirectory(GatewayError):
    """is a directory"""


class NotADirectory(GatewayError):
    """not a directory"""


class NotEmpty(GatewayError):
    """directory not empty"""


class BadPath(GatewayError):
    """invalid path"""


class BadOffset(GatewayError):
    """offset beyond the end of the file"""


class PermissionDenied(GatewayError):
    """permission denied"""


class NoSpace(GatewayError):
    """cache disk full"""


class Unavailable(GatewayError):
    """object storage unavailable"""


class Corrupt(GatewayError):
    """content checksum mismatch"""
