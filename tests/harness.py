"""Test helpers shared by the test modules: S3 reads and test-only constants.

A plain module, not conftest.py: tests/ansible has a conftest of its own, and `from conftest import`
would find whichever conftest pytest loaded last.
"""

from __future__ import annotations

import hashlib

import asyncssh
import pytest

from devstack import ObjectStore

BUCKET = "pacs-test"
PASSWORD = "test-only-password"  # test-only credential for the agents these tests start


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listed_objects(client, prefix: str = ""):
    """(key, GetObject response) of every object under prefix. An object listed and then deleted before its GET (a
    running agent's tombstone or clean-up) is left out: it is not in the bucket when read, and a caller polling for
    a state must not fail on that race."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            try:
                yield obj["Key"], client.get_object(Bucket=BUCKET, Key=obj["Key"])
            except client.exceptions.NoSuchKey:
                continue


def s3_objects(store: ObjectStore, prefix: str) -> dict[str, dict]:
    """Every object under prefix → {'size', 'sha256' (from the bytes themselves), 'meta'}."""
    out = {}
    for key, got in listed_objects(store.client(), prefix):
        body = got["Body"].read()
        out[key[len(prefix):]] = {"size": len(body), "sha256": sha256(body),
                                  "meta": {k.lower(): v for k, v in got.get("Metadata", {}).items()}}
    return out


async def sftp_refuses_changes(s: asyncssh.SFTPClient, remove: str, overwrite: str, rename: str) -> None:
    """Retained files over SFTP: a delete, an overwrite and a rename are each refused as permission denied."""
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        await s.remove(remove)
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        async with s.open(overwrite, "wb") as fh:
            await fh.write(b"tampered")
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        await s.posix_rename(rename, rename + ".moved")

