"""Encryption in transit: TLS to the object store with a private CA; SFTP with public keys only; FTPS; SMB3
encryption."""

from __future__ import annotations

import asyncio
import datetime
import ftplib
import io
import ipaddress
import json
import os
import subprocess
import uuid
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from smbprotocol.connection import Connection, Dialects
from smbprotocol.exceptions import NotSupported, SMBException
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect
from smbutil import Smb

from devstack import ObjectStore
from harness import BUCKET, PASSWORD, s3_objects, sha256


class FtpsClient(ftplib.FTP_TLS):
    """ftplib's FTPS client resuming the control connection's TLS session on each PROT P data connection, as
    FileZilla, WinSCP and curl do (the agent requires it: ftp.tls_session_reuse); ftplib's own shakes hands anew."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def ftps_session(agent_factory, tmp_path, **settings) -> tuple:
    """An FTPS agent and a session logged in over TLS with PROT P → (the agent, the session, the CA's file)."""
    import ssl
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key), **settings}).start()
    f = FtpsClient(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    f.prot_p()
    return agent, f, ca


def make_ca_and_cert(directory) -> tuple:
    """A test-only private CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacsgw test CA")])
    later = now + datetime.timedelta(days=1)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_store(tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path)
    store = ObjectStore("rclone", tmp_path / "s3", tls=(cert, key, ca)).start()
    store.create_bucket(BUCKET)
    yield store, ca
    store.stop()


def test_tls_to_object_store_with_private_ca(agent_factory, tls_store):
    store, ca = tls_store
    trusted = agent_factory(store, **{"uplink.ca_bundle": str(ca)}).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", trusted.ftp_port)
    f.login("pacs", PASSWORD)
    f.storbinary("STOR a.dcm", io.BytesIO(b"over tls"))
    f.quit()
    assert trusted.health()["uplink"]["reachable"] is True
    assert s3_objects(store, trusted.prefix)["a.dcm"]["sha256"] == sha256(b"over tls")
    # Without the CA the certificate is not trusted: the agent refuses to talk and says why.
    untrusted = agent_factory(store).start()
    h = untrusted.health()
    assert h["uplink"]["reachable"] is False and h["status"] == "degraded"
    assert "certificate" in h["uplink"]["last_error"].lower() or "ssl" in h["uplink"]["last_error"].lower()


def test_sftp_public_key_only(agent_factory, tmp_path):
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "keys").write_bytes(key.export_public_key())
    agent = agent_factory(**{"sftp.password_auth": False},
                          users=[{"name": "pacs", "password": PASSWORD, "authorized_keys": str(tmp_path / "keys")}])
    agent.start()

    async def session() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                   client_keys=None, known_hosts=None)
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", client_keys=[key],
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.listdir("/") == []

    asyncio.run(session())


def test_ftps_explicit_tls_and_plain_refused(agent_factory, tmp_path):
    import ssl
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key), "ftp.require_tls": True}).start()
    ctx = ssl.create_default_context(cafile=str(ca))
    f = FtpsClient(context=ctx, timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    assert "AUTH TLS" in f.sendcmd("FEAT")
    f.login("pacs", PASSWORD)  # AUTH TLS first: the password never crosses in clear
    assert isinstance(f.sock, ssl.SSLSocket)
    f.prot_p()
    data = b"protected" * 1000
    assert f.storbinary("STOR secret.dcm", io.BytesIO(data)).startswith("226")
    buf = io.BytesIO()
    f.retrbinary("RETR secret.dcm", buf.write)
    assert buf.getvalue() == data and f.nlst() == ["secret.dcm"]
    with pytest.raises(ftplib.error_perm, match="536"):
        f.prot_c()  # refused: data must stay protected
    f.quit()
    assert s3_objects(agent.store, agent.prefix)["secret.dcm"]["sha256"] == sha256(data)

    plain = ftplib.FTP(timeout=30)
    plain.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm, match="530 TLS required"):
        plain.login("pacs", PASSWORD)
    plain.close()
    assert agent.events("login_refused")


def test_ftps_optional_tls_still_serves_plain(agent_factory, tmp_path):
    import ssl
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key)}).start()
    plain = ftplib.FTP(timeout=30)
    plain.connect("127.0.0.1", agent.ftp_port)
    plain.login("pacs", PASSWORD)
    plain.storbinary("STOR clear.dcm", io.BytesIO(b"clear"))
    plain.quit()
    f = FtpsClient(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    f.prot_p()
    assert f.nlst() == ["clear.dcm"]
    f.quit()


def smb_session(agent, *, dialect: int | None = None, encrypt: bool = False) -> tuple[Session, TreeConnect]:
    """A session and tree connect to the agent's share; the client asks for encryption only if `encrypt`."""
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
    conn.connect(dialect=dialect, timeout=15)
    session = Session(conn, "pacs", PASSWORD, require_encryption=encrypt)
    session.connect()
    tree = TreeConnect(session, r"\\127.0.0.1\pacs")
    tree.connect()
    return session, tree


def smbd_sessions(agent) -> list[dict]:
    """The sessions as smbd itself reports them (smbstatus): dialect, encryption cipher, user."""
    conf = Path(agent.overrides["smb.state_dir"]) / "smb.conf"
    out = subprocess.run(["smbstatus", "-s", str(conf), "-b", "--json"], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout).get("sessions", {}).values())


def smb_conf_lines(agent) -> list[str]:
    return (Path(agent.overrides["smb.state_dir"]) / "smb.conf").read_text().splitlines()


def test_smb3_encryption_required(smb_agent):
    """`encryption = "required"`: a client that asks for encryption works; one that does not is encrypted
    anyway (Samba sets SMB2_SESSION_FLAG_ENCRYPT_DATA, smbd reports the cipher); SMB 2.x, which has no
    encryption, is refused at negotiation; SMB 3.0.2 (Windows 8.1 / Server 2012 R2) is served, encrypted."""
    agent = smb_agent(**{"smb.encryption": "required"}).start()
    assert "server smb encrypt = required" in smb_conf_lines(agent)
    data = os.urandom(200_000)
    asks = Smb(agent, encrypt=True)
    asks.write("enc.dcm", data)
    assert asks.read("enc.dcm") == data
    asks.close()

    session, tree = smb_session(agent, encrypt=False)
    assert (session.encrypt_data, tree.encrypt_data) == (True, True)
    assert [(s["session_dialect"], s["encryption"]["cipher"], s["encryption"]["degree"], s["username"])
            for s in smbd_sessions(agent)] == [("SMB3_11", "AES-128-GCM", "full", "pacsgw-pacs")]
    session.connection.disconnect()

    session, tree = smb_session(agent, dialect=Dialects.SMB_3_0_2, encrypt=False)
    assert (session.connection.dialect, session.encrypt_data, tree.encrypt_data) == (Dialects.SMB_3_0_2, True, True)
    assert [(s["session_dialect"], s["encryption"]["cipher"]) for s in smbd_sessions(agent)] == \
        [("SMB3_02", "AES-128-CCM")]
    session.connection.disconnect()

    for old in (Dialects.SMB_2_0_2, Dialects.SMB_2_1_0):
        with pytest.raises(NotSupported):
            smb_session(agent, dialect=old)
    assert s3_objects(agent.store, agent.prefix)["enc.dcm"]["sha256"] == sha256(data)


def test_smb3_encryption_off(smb_agent):
    """`encryption = "off"`: sessions are signed, not encrypted; a client that insists on encryption is
    refused (the server does not offer it)."""
    agent = smb_agent(**{"smb.encryption": "off"}).start()
    assert "server smb encrypt = off" in smb_conf_lines(agent)
    assert "server signing = mandatory" in smb_conf_lines(agent)
    session, tree = smb_session(agent, encrypt=False)
    assert (session.connection.supports_encryption, session.encrypt_data) == (False, False)
    assert [(s["encryption"]["cipher"], s["signing"]["degree"]) for s in smbd_sessions(agent)] == [("-", "full")]
    session.connection.disconnect()
    with pytest.raises(SMBException, match="encryption is required but the connection does not support it"):
        smb_session(agent, encrypt=True)
