"""Cut-short uploads: clients that vanish mid-transfer, over SFTP and FTP.

What each protocol can tell the server:

* **SFTP** has an explicit close of the file handle. A client that disconnects, crashes or is killed
  before sending it never completed the file: asyncssh still calls the server's close() on the open
  handle during cleanup, but the channel is closing then, and the gateway discards the staging file.
  Nothing appears under the final name: no catalog row, no object.
* **FTP stream mode** (the only mode PACS clients use) marks the end of a file by closing the data
  connection. A connection *reset* (RST: SO_LINGER 0, a crashed host's stack, a middlebox timing out)
  is an error the server sees, so the upload is discarded and the client gets no 226.
  A *clean* close (FIN) after fewer bytes than intended looks exactly like the end of the file: the
  server cannot know the client meant to send more, stores the truncated file and answers 226 — and a
  client process killed mid-upload usually closes its data socket this way (the kernel sends FIN).
  FTP has no size announcement in stream mode (ALLO is advisory and rarely sent), so this is the
  protocol's limit, not the gateway's. The protection is on the client side: upload to a temporary
  name (`x.dcm.part`), check `SIZE`, then `RNFR`/`RNTO` to the final name. A client that dies mid-upload
  never renames, so the final name never shows a truncated file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import subprocess
import sys
import textwrap
import time

import asyncssh
import pytest

from faultkit import (
    catalog_rows,
    ftp_get,
    ftp_login,
    ftp_put,
    ftp_raw_stor,
    ftp_reply,
    orphan_blobs,
    payload,
    reset_close,
    sftp_put,
    sftp_session,
    sha256,
    staging_files,
    wait_for,
)
from harness import PASSWORD, s3_objects

SIZE = 4 * 1024 * 1024
SENT = 1536 * 1024  # what the client managed to send before it went away


def assert_nothing_under(agent, store, path: str) -> None:
    """No catalog row, no object, no leftover staging or content file for path."""
    assert catalog_rows(agent, "SELECT path, state FROM entries WHERE path = ?", (path,)) == []
    assert orphan_blobs(agent) == set()
    assert store.client().list_objects_v2(Bucket="pacs-test", Prefix=agent.prefix + path).get("KeyCount", 0) == 0
    wait_for(lambda: staging_files(agent) == [], 10, what="staging to be cleaned up")


def kill_after_first_mib(client_args: list[str]) -> None:
    """Run a client script (`python -c`) that prints the bytes it has sent, and kill -9 it after 1 MiB."""
    client = subprocess.Popen([sys.executable, "-c", *client_args], stdout=subprocess.PIPE, text=True)
    try:
        for line in client.stdout:
            if int(line) >= 1024 * 1024:
                break
    finally:
        client.kill()
        client.wait()


def aborted(agent, path: str) -> list[dict]:
    return [e for e in agent.events("upload_aborted") if e["path"] == path]


# --- SFTP ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["disconnect", "abort"])
async def test_sftp_client_drops_mid_upload(agent_factory, seaweed, how):
    """Close the SSH connection (polite disconnect, or a hard transport abort) with the file still open."""
    a = agent_factory().start()
    path = f"CT/cut/{how}.dcm"
    data = payload(path, SIZE)
    conn = await asyncssh.connect("127.0.0.1", a.sftp_port, username="pacs", password=PASSWORD,
                                  known_hosts=None, client_keys=None, agent_path=None)
    sftp = await conn.start_sftp_client()
    f = await sftp.open("/" + path, "wb")
    for off in range(0, SENT, 256 * 1024):
        await f.write(data[off:off + 256 * 1024], off)
    # The bytes so far are on the server, in its staging file.
    assert len(staging_files(a)) == 1
    if how == "disconnect":
        conn.close()
    else:
        conn.abort()
    await conn.wait_closed()

    wait_for(lambda: aborted(a, path), 10, what="the upload_aborted event")
    assert aborted(a, path)[0]["bytes"] == SENT
    assert_nothing_under(a, seaweed, path)
    async with sftp_session(a) as sftp2:
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp2.stat("/" + path)
        # The name is free and the gateway healthy: the whole file stored later goes through.
        await sftp_put(sftp2, "/" + path, data)
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)


KILLED_SFTP_CLIENT = textwrap.dedent("""
    import asyncio, sys, asyncssh
    async def main(port, path, size):
        async with asyncssh.connect("127.0.0.1", port, username="pacs", password=sys.argv[4],
                                    known_hosts=None, client_keys=None, agent_path=None) as conn:
            sftp = await conn.start_sftp_client()
            f = await sftp.open(path, "wb")
            block = b"x" * 65536
            off = 0
            while True:
                await f.write(block, off)
                off += len(block)
                print(off, flush=True)
                await asyncio.sleep(0.01)
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
""")


def test_sftp_client_killed_mid_upload(agent_factory, seaweed):
    """kill -9 the client process in the middle of a file: nothing appears under its name."""
    a = agent_factory().start()
    path = "CT/cut/killed-sftp.dcm"
    kill_after_first_mib([KILLED_SFTP_CLIENT, str(a.sftp_port), "/" + path, str(SIZE), PASSWORD])
    wait_for(lambda: aborted(a, path), 10, what="the upload_aborted event")
    assert_nothing_under(a, seaweed, path)


# --- FTP -----------------------------------------------------------------------------------------------


def test_ftp_upload_reset_is_discarded(agent_factory, seaweed):
    """RST on the data connection mid-upload: no 226, no object, no catalog row."""
    a = agent_factory().start()
    path = "CT/cut/reset.dcm"
    data = payload(path, SIZE)
    ftp = ftp_login(a)
    sock = ftp_raw_stor(ftp, path)
    sock.sendall(data[:SENT])
    time.sleep(0.2)  # the server has read (some of) it
    reset_close(sock)
    with pytest.raises(ftplib.error_temp) as reply:
        ftp.voidresp()
    assert str(reply.value).startswith("426")
    wait_for(lambda: aborted(a, path), 10, what="the upload_aborted event")
    assert_nothing_under(a, seaweed, path)
    assert ftp_reply(ftp, f"SIZE {path}").startswith("550")
    # The control connection is still usable, and the complete file goes through afterwards.
    assert ftp_put(ftp, path, data).startswith("226")
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)
    ftp.quit()


def test_ftp_clean_early_close_is_indistinguishable(agent_factory, seaweed):
    """Today's behaviour, asserted: a clean close after SENT bytes of SIZE is a complete SENT-byte file.

    This is FTP stream mode's limit (see the module docstring): the server answers 226 and stores exactly
    the bytes the client sent. If this ever changes (e.g. ALLO/size checks), change the test on purpose.
    """
    a = agent_factory().start()
    path = "CT/cut/truncated.dcm"
    data = payload(path, SIZE)
    ftp = ftp_login(a)
    sock = ftp_raw_stor(ftp, path)
    sock.sendall(data[:SENT])
    sock.close()  # FIN: looks like the end of the file
    assert ftp.voidresp().startswith("226")
    assert ftp.sendcmd(f"SIZE {path}") == f"213 {SENT}"
    obj = s3_objects(seaweed, a.prefix)[path]  # write-through: in S3 before the 226
    assert obj["size"] == SENT and obj["sha256"] == sha256(data[:SENT])
    ftp.quit()


KILLED_FTP_CLIENT = textwrap.dedent("""
    import ftplib, sys, time
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", int(sys.argv[1]))
    ftp.login("pacs", sys.argv[3])
    ftp.voidcmd("TYPE I")
    conn, _ = ftp.ntransfercmd("STOR " + sys.argv[2])
    off = 0
    while True:
        conn.sendall(b"x" * 65536)
        off += 65536
        print(off, flush=True)
        time.sleep(0.01)
""")


def test_ftp_part_then_rename_protects_the_final_name(agent_factory, seaweed):
    """The .part → RNTO pattern: a client killed mid-upload never exposes a truncated file as x.dcm."""
    a = agent_factory().start()
    final, part = "CT/part/1.dcm", "CT/part/1.dcm.part"
    kill_after_first_mib([KILLED_FTP_CLIENT, str(a.ftp_port), part, PASSWORD])
    # The server saw the data connection end: the .part is stored truncated (FIN) or discarded (RST).
    wait_for(lambda: a.events("stored") and a.events("stored")[-1]["path"] == part or aborted(a, part), 15,
             what="the killed upload to end")
    a.wait_drained(30)
    assert orphan_blobs(a) == set()  # whichever way it ended, no content file leaked
    ftp = ftp_login(a)
    assert ftp_reply(ftp, f"SIZE {final}").startswith("550")
    assert catalog_rows(a, "SELECT path FROM entries WHERE path = ?", (final,)) == []
    assert final not in s3_objects(seaweed, a.prefix)

    # The same pattern completed: STOR .part, verify SIZE, RNFR/RNTO. Only then does the final name exist,
    # with the whole content, in the listing and in S3; the .part key is gone from S3.
    data = payload(final, SIZE)
    assert ftp_put(ftp, part, data).startswith("226")
    assert ftp.sendcmd(f"SIZE {part}") == f"213 {SIZE}"
    ftp.rename(part, final)
    a.wait_drained(30)
    objects = s3_objects(seaweed, a.prefix)
    assert set(objects) == {final} and objects[final]["sha256"] == sha256(data)
    assert sha256(ftp_get(ftp, final)) == sha256(data)
    ftp.quit()


# --- disconnecting while the gateway is still working on the acknowledgement -----------------------------


def test_ftp_control_connection_lost_while_waiting_for_226(agent_factory, seaweed):
    """The whole file was sent, then the client vanished while the write-through PUT was in flight.

    The client was not told anything, but it had declared the file complete: the gateway may keep it,
    and then it must keep it consistently — the cached copy stays, the object lands in S3, the queue
    drains. (The upload line is throttled so the PUT takes a few seconds.)
    """
    a = agent_factory(**{"uplink.bwlimit": "1MB"}).start()
    path = "CT/lost/ack.dcm"
    data = payload(path, SIZE)
    ftp = ftp_login(a)
    sock = ftp_raw_stor(ftp, path)
    sock.sendall(data)
    sock.close()
    wait_for(lambda: [e for e in a.events("stored") if e["path"] == path], 10, what="the catalog commit")
    ftp.sock.close()  # gone before the 226
    ftp.file.close()
    a.wait_drained(60)
    rows = catalog_rows(a, "SELECT state, blob FROM entries WHERE path = ?", (path,))
    assert rows and rows[0][0] == "clean"
    blob = rows[0][1]
    assert blob is not None and (a.workdir / "cache" / "data" / blob[:2] / blob).is_file()
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)
    ftp = ftp_login(a)
    assert sha256(ftp_get(ftp, path)) == sha256(data)
    assert a.events("cache_copy_missing") == [] and orphan_blobs(a) == set()
    ftp.quit()


async def test_sftp_connection_lost_while_waiting_for_close_ok(agent_factory, seaweed):
    """SFTP's version of the test above: CLOSE sent, connection aborted before the OK came back."""
    a = agent_factory(**{"uplink.bwlimit": "1MB"}).start()
    path = "CT/lost/close.dcm"
    data = payload(path, SIZE)
    conn = await asyncssh.connect("127.0.0.1", a.sftp_port, username="pacs", password=PASSWORD,
                                  known_hosts=None, client_keys=None, agent_path=None)
    sftp = await conn.start_sftp_client()
    f = await sftp.open("/" + path, "wb")
    await f.write(data)
    closing = asyncio.create_task(f.close())
    await asyncio.to_thread(wait_for, lambda: [e for e in a.events("stored") if e["path"] == path], 10,
                            what="the catalog commit")
    conn.abort()
    with pytest.raises((asyncssh.Error, OSError)):
        await closing
    await asyncio.to_thread(a.wait_drained, 60)
    rows = catalog_rows(a, "SELECT state, blob FROM entries WHERE path = ?", (path,))
    assert rows and rows[0][0] == "clean"
    blob = rows[0][1]
    assert blob is not None and (a.workdir / "cache" / "data" / blob[:2] / blob).is_file()
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)
    assert a.events("cache_copy_missing") == [] and orphan_blobs(a) == set()


def test_ftp_control_connection_lost_while_its_file_is_being_sealed(agent_factory, seaweed):
    """The whole file sent, then the control connection closed at once, while the commit still hashes and fsyncs a
    large file: the session's cut cancels the commit's waiter before the row exists. The commit runs to its end on its
    own and the write ends — the file stored consistently, no staging file or blob left, its directory free to rename
    (refused while the gateway still counts a write below it), a stop that finds nothing in flight."""
    a = agent_factory().start()
    path, data = "CT/sealing/big.dcm", payload("sealing", 48 * 1024 * 1024)
    ftp = ftp_login(a)
    ftp.mkd("CT")
    ftp.mkd("CT/sealing")
    sock = ftp_raw_stor(ftp, path)
    sock.sendall(data)
    sock.close()
    staged = a.workdir / "cache" / "staging"

    def all_read() -> bool:  # on a loaded machine the agent may still be reading: a cut there is an abort
        with contextlib.suppress(FileNotFoundError):  # else sealed and moved meanwhile
            if any(f.stat().st_size == len(data) for f in staged.iterdir()):
                return True
        return any(e["path"] == path for e in a.events("stored"))

    wait_for(all_read, 30, 0.005, "the data all read")
    ftp.sock.close()  # gone before the 226, before the seal could end
    ftp.file.close()
    wait_for(lambda: [e for e in a.events("stored") if e["path"] == path], 30, what="the commit nobody waits for")
    a.wait_drained(60)
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)
    assert staging_files(a) == [] and orphan_blobs(a) == set()
    ftp = ftp_login(a)
    ftp.rename("CT/sealing", "CT/sealed")
    assert ftp.size("CT/sealed/big.dcm") == len(data)
    ftp.quit()
    a.stop()
    assert a.events("stopped")[-1]["drained"] is True
