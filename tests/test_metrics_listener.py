"""http.metrics_listen: the agent's /metrics for the central Prometheus, over TLS with basic auth (a real
agent process on loopback, a real TLS handshake against a CA made here), and the config errors that name
the key and the file."""

from __future__ import annotations

import base64
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.auth import hash_password
from agent.config import ConfigError, load
from devstack import AgentProc, free_port

PASSWORD = "scrape-password-for-tests"  # test-only


def _make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (certificate, key, CA)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-subj", "/CN=metrics-test-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(d / "box.key"), "-out", str(d / "box.csr"), "-subj", "/CN=box")
    (d / "box.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "box.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(d / "box.ext"), "-out", str(d / "box.crt"))
    return d / "box.crt", d / "box.key", d / "ca.crt"


def _get(url: str, ca: Path | None, auth: tuple[str, str] | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=15, context=ctx) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_metrics_over_tls_need_basic_auth(agent_factory, tmp_path):
    cert, key, ca = _make_tls(tmp_path)
    port = free_port()
    agent = agent_factory(**{"http.metrics_listen": f"127.0.0.1:{port}", "http.metrics_tls_cert": str(cert),
                             "http.metrics_tls_key": str(key), "http.metrics_user": "prometheus",
                             "http.metrics_password_hash": hash_password(PASSWORD)}).start()
    url = f"https://127.0.0.1:{port}/metrics"
    status, _, headers = _get(url, ca)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic ")
    assert _get(url, ca, ("prometheus", "wrong-password"))[0] == 401
    assert _get(url, ca, ("someone", PASSWORD))[0] == 401
    status, text, _ = _get(url, ca, ("prometheus", PASSWORD))
    assert status == 200 and "pacsgw_uplink_up 1" in text
    # the cached accepted header still needs the exact credentials; a wrong one after a right one fails
    assert _get(url, ca, ("prometheus", PASSWORD + "x"))[0] == 401
    # only /metrics: the status page, /healthz and admin requests are not on this listener
    assert _get(f"https://127.0.0.1:{port}/healthz", ca, ("prometheus", PASSWORD))[0] == 404
    # TLS only: a plain-HTTP request to the port gets no metrics
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _get(f"http://127.0.0.1:{port}/metrics", None, ("prometheus", PASSWORD))
    assert len(agent.wait_events("metrics_refused")) == 1  # one per address and minute
    assert PASSWORD not in agent.log_path.read_text()


def test_relative_metrics_tls_paths_are_the_config_files_neighbours(tmp_path, seaweed):
    """Like every path setting: relative to the config file's directory, not to where the agent was started."""
    (tmp_path / "cfg").mkdir()
    cert, key, _ = _make_tls(tmp_path / "cfg")
    proc = AgentProc(tmp_path / "cfg", seaweed, "cfg/", users=[{"name": "pacs", "password": "pacs-password-1"}],
                     overrides={"http.metrics_listen": f"127.0.0.1:{free_port()}",
                                "http.metrics_tls_cert": cert.name, "http.metrics_tls_key": key.name})
    cfg = load(proc.config_path)
    assert (cfg.http.metrics_tls_cert, cfg.http.metrics_tls_key) == (str(cert.resolve()), str(key.resolve()))


def _config_error(tmp_path: Path, seaweed, **overrides) -> ConfigError:
    proc = AgentProc(tmp_path / "cfg", seaweed, "cfg/", overrides=overrides,
                     users=[{"name": "pacs", "password": "pacs-password-1"}])
    with pytest.raises(ConfigError) as e:
        load(proc.config_path)
    assert str(proc.config_path) in str(e.value)
    return e.value


def test_bad_metrics_tls_config_names_the_key_and_the_file(tmp_path, seaweed):
    (tmp_path / "cfg").mkdir()
    listen = {"http.metrics_listen": f"127.0.0.1:{free_port()}"}
    missing = tmp_path / "no-such.crt"
    e = _config_error(tmp_path, seaweed, **listen, **{"http.metrics_tls_cert": str(missing),
                                                      "http.metrics_tls_key": str(missing)})
    assert e.key == "http.metrics_tls_cert" and str(missing) in str(e)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    e = _config_error(tmp_path, seaweed, **listen, **{"http.metrics_tls_cert": str(garbage),
                                                      "http.metrics_tls_key": str(garbage)})
    assert e.key == "http.metrics_tls_cert" and str(garbage) in str(e)
    e = _config_error(tmp_path, seaweed, **listen, **{"http.metrics_tls_cert": str(garbage)})
    assert e.key == "http.metrics_tls_key"
    e = _config_error(tmp_path, seaweed, **listen, **{"http.metrics_user": "prometheus"})
    assert e.key == "http.metrics_password_hash"
    e = _config_error(tmp_path, seaweed, **listen, **{"http.metrics_user": "prometheus",
                                                      "http.metrics_password_hash": "plain-text"})
    assert e.key == "http.metrics_password_hash" and "hash-password" in str(e)
    e = _config_error(tmp_path, seaweed, **{"http.metrics_user": "prometheus"})
    assert e.key == "http.metrics_user" and "metrics_listen" in str(e)
