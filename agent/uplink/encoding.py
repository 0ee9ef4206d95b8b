"""zstd on the line (`[uplink] compress = "zstd"`): which files are worth it, and the codec both ways; what is
compressed and how an object says so: docs/dicom.md. The frame's own checksum fails a damaged object in the
decoder first, before the original's `sha256` is checked.
"""

from __future__ import annotations

from typing import Any, Mapping

import zstandard

ENCODING = "pacsgw-encoding"
SIZE = "pacsgw-size"
ZSTD = "zstd"
MAX_SIZE = 1 << 50  # 1 PiB: far above any file a PACS stores, far below SQLite's 2**63
LEVEL = 3  # bench/dicom_compress.py: level 3 is within a few % of 9's ratio at several times the speed

# Implicit VR LE, Explicit VR LE, Explicit VR BE (retired, still written by old modalities)
UNCOMPRESSED_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


class Undecodable(Exception):
    """A compressed object's bytes do not decode (damaged, truncated, or not what its metadata says)."""


def worth_compressing(transfer_syntax: str | None) -> bool:
    return transfer_syntax in UNCOMPRESSED_SYNTAXES


def _lower(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in (metadata or {}).items()}  # S3 metadata keys are HTTP headers


def encoding_of(metadata: Mapping[str, str] | None) -> str | None:
    """The object's encoding from its metadata (None: as given); an unknown one is Undecodable, not garbage."""
    if (enc := _lower(metadata).get(ENCODING)) not in (None, ZSTD):
        raise Undecodable(f"unknown {ENCODING} {enc!r}")
    return enc


def logical_size(head: Mapping[str, Any]) -> int:
    """The size of the file an object holds (a HEAD or GET answer): its SIZE metadata when encoded."""
    if encoding_of(head.get("Metadata")) is None:
        return int(head["ContentLength"])
    value = _lower(head.get("Metadata")).get(SIZE, "")
    # ASCII digits only ('²' is a digit to str.isdigit, not to int), a size SQLite can hold
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_SIZE:
        raise Undecodable(f"compressed object without a valid {SIZE} ({value[:40]!r})")
    return int(value)


def metadata(size: int) -> dict[str, str]:
    """The user metadata that marks a zstd object of an original of `size` bytes."""
    return {ENCODING: ZSTD, SIZE: str(size)}


def compressor(size: int) -> Any:
    """A streaming compressor for `size` bytes (one zstd frame with content size and checksum)."""
    return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compressobj(size=size)


def compress(body: bytes) -> bytes:
    return bytes(zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(body))


# A frame decodes to up to 32 768 times its size: SLICE bytes at a time give at most 32 MiB (256 RLE blocks of 128 KiB)
SLICE = 1024
PIECE = 4 << 20           # decoded bytes handed on at a time (about: one SLICE more at most)
MAX_WINDOW = 1 << 23      # our frames (level 3) use 2 MiB at most; a frame may not make the decoder hold more


class Decoder:
    """One zstd frame decoded a chunk at a time (blocking); past `limit` (the metadata's size) Undecodable."""

    def __init__(self, limit: int | None = None) -> None:
        self._obj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
        self._limit, self._decoded, self._pending = limit, 0, memoryview(b"")

    def _ended(self) -> bool:  # a call: mypy would keep `eof` narrowed to False across decompress()
        return bool(self._obj.eof)

    def push(self, data: bytes) -> None:
        self._pending = memoryview(bytes(self._pending) + data) if self._pending else memoryview(data)

    def pull(self) -> bytes | None:
        """The next decoded bytes of what was pushed (about PIECE at most); None once it is all decoded."""
        if not self._pending:
            return None
        out = bytearray()
        while self._pending and len(out) < PIECE:
            piece, self._pending = self._pending[:SLICE], self._pending[SLICE:]
            out += self._decode(piece)
        return bytes(out)

    def _decode(self, data: memoryview) -> bytes:
        if self._ended():
            raise Undecodable("bytes after the end of the zstd frame")
        try:
            out = self._obj.decompress(data)
        except zstandard.ZstdError as e:
            raise Undecodable(f"zstd: {e}") from e
        if self._ended() and self._obj.unused_data:
            raise Undecodable("bytes after the end of the zstd frame")
        self._decoded += len(out)
        if self._limit is not None and self._decoded > self._limit:
            raise Undecodable(f"decodes to more than the {self._limit} bytes its metadata says")
        return bytes(out)

    def finish(self) -> None:
        if not self._ended():
            raise Undecodable("the zstd frame ends early (truncated object)")


def decode_head(data: bytes, n: int) -> bytes:
    """The first n decoded bytes of the start of a zstd frame (a header from a ranged read), decoding no further."""
    d, out = Decoder(), bytearray()
    d.push(data)
    while len(out) < n and (piece := d.pull()) is not None:
        out += piece
    return bytes(out[:n])
