"""zstd on the line (issue 17, `[uplink] compress = "zstd"`): uncompressed DICOM goes compressed, marked in
its metadata, and comes back byte-identical over every protocol, also to a replacement box that knows
nothing of it (logical sizes in its listings, ranged reads refused, index sizes from the metadata);
compressed syntaxes and non-DICOM files go as they are; `pacsgw fsck --remote` decodes compressed objects
and catches a damaged one. Real agent, real SeaweedFS, real FTP/SFTP/SMB clients, files written by pydicom."""

from __future__ import annotations

import asyncio
import ftplib
import io
import shutil
import sqlite3
import subprocess
import sys

import asyncssh
import numpy as np
import pydicom
import pytest
import zstandard
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from smbutil import Smb
from test_dicom import pacsgw, sftp_write
from test_integrity import fsck

from agent.uplink.encoding import Decoder, Undecodable, compress, worth_compressing
from bench.dicomgen import ct_slice
from harness import BUCKET, PASSWORD, sha256

MiB = 1024 * 1024
RNG = np.random.default_rng(17)


def slice_(rows: int, modality: str = "CT") -> bytes:
    return ct_slice(RNG, patient="P-Z", study_uid=generate_uid(), series_uid=generate_uid(), rows=rows, cols=rows,
                    modality=modality)


def jpeg() -> bytes:
    """A DICOM file in JPEG Baseline: its pixel data is compressed already."""
    ds = pydicom.dcmread(io.BytesIO(slice_(64)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([bytes(20_000)])  # zeros: zstd would shrink it, and must not be asked to
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def feed(d: Decoder, data: bytes) -> bytes:
    """Push data into d and pull every byte it decodes to, as the uplink's GET does."""
    d.push(data)
    return b"".join(iter(d.pull, None))


def test_codec_refuses_damage():
    data = slice_(64)
    packed = compress(data)
    d = Decoder()
    assert b"".join(feed(d, packed[i:i + 1000]) for i in range(0, len(packed), 1000)) == data
    d.finish()
    with pytest.raises(Undecodable, match="ends early"):
        d = Decoder()
        feed(d, packed[:-10])
        d.finish()
    with pytest.raises(Undecodable, match="after the end"):
        feed(Decoder(), packed + b"x")
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0x40
    with pytest.raises(Undecodable):
        d = Decoder()
        feed(d, bytes(flipped))
        d.finish()
    assert worth_compressing("1.2.840.10008.1.2") and worth_compressing("1.2.840.10008.1.2.1")
    assert not worth_compressing(JPEGBaseline8Bit) and not worth_compressing("1.2.840.10008.1.2.1.99")
    assert not worth_compressing(None)


def ftp_login(agent) -> ftplib.FTP:
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    return f


def test_compressed_round_trip_replacement_box_and_fsck(smb_agent, seaweed):
    agent = smb_agent(**{"uplink.compress": "zstd", "uplink.multipart_threshold": "5MiB",
                         "uplink.multipart_chunk": "5MiB", "uplink.bwlimit": "8MB"}).start()
    big = slice_(3584)  # 25 MiB: a multipart upload of more than one compressed part
    files = {"CT/ftp.dcm": slice_(256), "CT/big-ftp.dcm": big, "MR/sftp.dcm": slice_(256, "MR"),
             "CT/smb.dcm": slice_(256), "CT/jpeg.dcm": jpeg(), "CT/notes.txt": b"compressible text " * 2000}
    compressed = {"CT/ftp.dcm", "CT/big-ftp.dcm", "MR/sftp.dcm", "CT/smb.dcm"}
    f = ftp_login(agent)
    f.mkd("CT")
    f.mkd("MR")
    for path in ("CT/ftp.dcm", "CT/big-ftp.dcm", "CT/jpeg.dcm", "CT/notes.txt"):
        f.storbinary(f"STOR {path}", io.BytesIO(files[path]))
    f.quit()

    sftp_write(agent, "MR/sftp.dcm", files["MR/sftp.dcm"])
    smb = Smb(agent)
    smb.write("CT/smb.dcm", files["CT/smb.dcm"])
    smb.close()
    agent.wait_drained(120)

    client = seaweed.client()
    for path, data in files.items():
        got = client.get_object(Bucket=BUCKET, Key=agent.prefix + path)
        meta, body = {k.lower(): v for k, v in got["Metadata"].items()}, got["Body"].read()
        assert meta["sha256"] == sha256(data), path  # the original's hash, also of a compressed object
        if path in compressed:
            assert meta["pacsgw-encoding"] == "zstd" and meta["pacsgw-size"] == str(len(data)), path
            assert len(body) < len(data) * 0.8 and zstandard.ZstdDecompressor().decompress(body) == data, path
        else:
            assert "pacsgw-encoding" not in meta and body == data, path

    # A replacement box: same config, its SSD (catalog and cache) lost. The index comes back from the bucket
    # with the files' sizes, not the compressed objects'.
    agent.stop()
    shutil.rmtree(agent.workdir / "cache")
    (agent.workdir / "cache").mkdir()
    rebuilt = pacsgw(agent, "index-rebuild")
    assert rebuilt["objects"] == len(files) and rebuilt["failed"] == 0
    found = pacsgw(agent, "find", "--modality", "CT")
    assert {i["path"]: i["bytes"] for i in found["items"]} == \
        {p: len(files[p]) for p in ("CT/ftp.dcm", "CT/big-ftp.dcm", "CT/smb.dcm", "CT/jpeg.dcm")}
    agent.start()

    f = ftp_login(agent)
    listed = {f"{d}/{name}": int(facts["size"]) for d in ("CT", "MR") for name, facts in f.mlsd(d)
              if facts.get("type") == "file"}
    assert listed == {p: len(d) for p, d in files.items()}  # logical sizes in a fresh box's listing

    # a cold read at an offset of a compressed object: no ranged GET into the zstd stream, the right bytes
    start, length = 20 * MiB, MiB

    async def sftp_reads() -> tuple[bytes, bytes, int]:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            async with s.open("CT/big-ftp.dcm", "rb") as fh:
                await fh.seek(start)
                part = await fh.read(length)
            async with s.open("MR/sftp.dcm", "rb") as fh:
                whole = await fh.read()
            return part, whole, (await s.stat("CT/smb.dcm")).size

    part, whole, smb_size = asyncio.run(sftp_reads())
    assert part == big[start:start + length] and whole == files["MR/sftp.dcm"] and smb_size == len(files["CT/smb.dcm"])
    assert not [e for e in agent.events("ranged_get") + agent.events("ranged_get_failed")
                if e["path"] == "CT/big-ftp.dcm"]
    for path in ("CT/ftp.dcm", "CT/big-ftp.dcm", "CT/jpeg.dcm", "CT/notes.txt"):
        buf = io.BytesIO()
        f.retrbinary(f"RETR {path}", buf.write)
        assert buf.getvalue() == files[path], path
    f.quit()
    smb = Smb(agent)
    assert smb.read("CT/smb.dcm") == files["CT/smb.dcm"]
    smb.close()

    # fsck --remote decodes compressed objects; a damaged one (same size and metadata, a flipped byte in the
    # zstd stream: S3's checksum of what it was sent says nothing) is caught and re-uploaded from the cache
    assert fsck(agent, "--remote")[0] == 0
    key = agent.prefix + "CT/ftp.dcm"
    got = client.get_object(Bucket=BUCKET, Key=key)
    body = bytearray(got["Body"].read())
    body[len(body) // 2] ^= 0x40
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body), Metadata=got["Metadata"])
    code, report = fsck(agent, "--remote")
    assert code == 1 and report["remote_missing"] == ["CT/ftp.dcm"] and report["lost"] == []
    code, report = fsck(agent, "--remote", "--repair")
    assert report["requeued"] == ["CT/ftp.dcm"]
    agent.wait_drained()
    assert fsck(agent, "--remote")[0] == 0
    repaired = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert zstandard.ZstdDecompressor().decompress(repaired) == files["CT/ftp.dcm"]


def read_back(agent, first_ftp: str, first_sftp: str, files: dict[str, bytes]) -> None:
    """Every file read whole over FTP and over SFTP equals what was written (first_ftp is fetched from S3 by an
    FTP read, first_sftp by an SFTP read: each protocol decodes one cold object), and SFTP stats the file's size."""
    f = ftp_login(agent)

    def retr(path: str) -> bytes:
        buf = io.BytesIO()
        f.retrbinary(f"RETR {path}", buf.write)
        return buf.getvalue()

    assert retr(first_ftp) == files[first_ftp]

    async def sftp() -> dict[str, tuple[int, bytes]]:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            out = {}
            for path in [first_sftp, *sorted(files)]:
                size = (await s.stat(path)).size
                async with s.open(path, "rb") as fh:
                    out[path] = (size, await fh.read())
            return out

    for path, (size, data) in asyncio.run(sftp()).items():
        assert size == len(files[path]) and data == files[path], path
    for path, data in files.items():
        assert retr(path) == data, path
    f.quit()


def test_a_box_with_compress_off_reads_what_was_compressed(agent_factory):
    """Decoding and the sizes in listings follow each object's own metadata (pacsgw-encoding, pacsgw-size), not
    this box's `compress`: the same box with the setting turned off, and another box (fresh catalog) that learns
    of the objects from listings and rebuilds its index from the bucket, read them byte-identical; fsck is clean."""
    writer = agent_factory(**{"uplink.compress": "zstd"}).start()
    files = {"CT/ftp.dcm": slice_(256), "CT/ftp2.dcm": slice_(128), "MR/sftp.dcm": slice_(256, "MR"),
             "CT/notes.txt": b"compressible text " * 2000}
    f = ftp_login(writer)
    f.mkd("CT")
    f.mkd("MR")
    for path in ("CT/ftp.dcm", "CT/ftp2.dcm", "CT/notes.txt"):
        f.storbinary(f"STOR {path}", io.BytesIO(files[path]))
    f.quit()
    sftp_write(writer, "MR/sftp.dcm", files["MR/sftp.dcm"])
    writer.wait_drained()
    writer.stop()

    # The same box, compression turned off, its cached copies evicted: the reads fetch and decode.
    writer.overrides["uplink.compress"] = "off"
    writer.write_config()
    writer.start()
    evicted = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(writer.config_path),
                              *files], capture_output=True, text=True, timeout=60)
    assert evicted.returncode == 0, evicted.stdout + evicted.stderr
    read_back(writer, "CT/ftp.dcm", "MR/sftp.dcm", files)
    assert fsck(writer, "--remote")[0] == 0

    # Another box, compression off, on the same prefix with a catalog of its own: it knows the objects only from
    # listings (logical sizes from their HEADs) and its study index only from the bucket.
    other = agent_factory(prefix=writer.prefix, **{"uplink.compress": "off"})
    rebuilt = pacsgw(other, "index-rebuild")
    assert rebuilt["objects"] == len(files) and rebuilt["failed"] == 0
    found = pacsgw(other, "find", "--modality", "CT")
    assert {i["path"]: i["bytes"] for i in found["items"]} == {p: len(files[p]) for p in ("CT/ftp.dcm", "CT/ftp2.dcm")}
    other.start()
    f = ftp_login(other)
    listed = {f"{d}/{name}": int(facts["size"]) for d in ("CT", "MR") for name, facts in f.mlsd(d)
              if facts.get("type") == "file"}
    f.quit()
    assert listed == {p: len(d) for p, d in files.items()}
    read_back(other, "CT/ftp2.dcm", "CT/ftp.dcm", files)
    assert fsck(other, "--remote")[0] == 0
    other.stop()

    # A catalog from before listings carried logical sizes holds a compressed object's stored size (the row a
    # listing merged: clean, uncached). Written here with sqlite: the current agent no longer produces it.
    stored = len(compress(files["MR/sftp.dcm"]))
    db = sqlite3.connect(other.workdir / "cache" / "catalog.sqlite")
    with db:
        assert db.execute("UPDATE entries SET size = ?, blob = NULL, sha256 = NULL WHERE path = 'MR/sftp.dcm'",
                          (stored,)).rowcount == 1
    db.close()
    code, report = fsck(other, "--remote")
    assert code == 1 and report["wrong_size"] == ["MR/sftp.dcm"] and report["lost"] == [] == report["remote_missing"]
    assert fsck(other, "--remote", "--repair")[1]["resized"] == ["MR/sftp.dcm"]
    assert fsck(other, "--remote")[0] == 0
    other.start()
    read_back(other, "MR/sftp.dcm", "CT/notes.txt", files)


def test_objects_whose_encoding_metadata_lies_leave_their_directory_listed(agent_factory, seaweed):
    """Another S3 client's objects with an unknown pacsgw-encoding, a zstd flag without pacsgw-size, or a size
    beyond what a file can have: each is left out of the listing (named in remote_object_skipped), its
    siblings are listed and read. Before, one of them failed the whole directory's listing (Undecodable, or
    SQLite's OverflowError): every file in it was 'unavailable' to every client."""
    a = agent_factory().start()
    s3, good = seaweed.client(), b"good file " * 100
    s3.put_object(Bucket=BUCKET, Key=a.prefix + "X/good.dcm", Body=good)
    for name, meta in {"gzip": {"pacsgw-encoding": "gzip"}, "nosize": {"pacsgw-encoding": "zstd"},
                       "huge": {"pacsgw-encoding": "zstd", "pacsgw-size": "9" * 30}}.items():
        s3.put_object(Bucket=BUCKET, Key=f"{a.prefix}X/{name}.dcm", Body=compress(good), Metadata=meta)
    f = ftp_login(a)
    assert {name: int(facts["size"]) for name, facts in f.mlsd("X")} == {"good.dcm": len(good)}
    got = io.BytesIO()
    f.retrbinary("RETR X/good.dcm", got.write)
    assert got.getvalue() == good
    with pytest.raises(ftplib.error_perm, match="^550"):
        f.retrbinary("RETR X/gzip.dcm", io.BytesIO().write)
    f.quit()
    assert sorted(e["path"] for e in a.wait_events("remote_object_skipped", 3)) == [
        "X/gzip.dcm", "X/huge.dcm", "X/nosize.dcm"]


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_a_zstd_bomb_from_another_client_is_refused_within_bounded_memory(agent_factory, seaweed):
    """An object flagged zstd whose 16 KB frame decodes to 512 MB (pacsgw-size says 1 000 bytes): the read fails
    (451, fetch_failed Corrupt) as soon as the decoded bytes pass the promised size, with the agent's memory and
    cache disk untouched. Before, each 256 KiB block of an object was decoded whole in one call: the agent held
    the 512 MB (a 256 KiB frame gives 8 GB) and wrote it to the cache before the size check failed."""
    a = agent_factory().start()
    packer, zeros = zstandard.ZstdCompressor(level=19).compressobj(), bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(512)) + packer.flush()
    assert len(bomb) < 32 * 1024
    seaweed.client().put_object(Bucket=BUCKET, Key=a.prefix + "B/bomb.dcm", Body=bomb,
                                Metadata={"pacsgw-encoding": "zstd", "pacsgw-size": "1000"})
    f = ftp_login(a)
    before = _peak_rss(a.proc.pid)
    with pytest.raises(ftplib.error_temp, match="^451.*decodes to more than the 1000 bytes"):
        f.retrbinary("RETR B/bomb.dcm", io.BytesIO().write)
    f.quit()
    assert _peak_rss(a.proc.pid) - before < 100 << 20
