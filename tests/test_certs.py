"""`fedtune certs`: a CA, the SuperLink's TLS certificate and per-site SuperNode
authentication keys, in the formats Flower 1.41 accepts; checked with a real TLS
handshake and the key loaders Flower uses."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedtune.certs import add_site, make_certs
from fedtune.cli import app
from fedtune.errors import ConfigError


def test_chain_san_and_key_formats(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "c", ["org-a", "org-b"], ["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The given hosts, and loopback for the server operator's own tools (`fedtune server`
    # registers the sites over 127.0.0.1).
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certs.sites == ["org-a", "org-b"]
    for site in certs.sites:
        # What flower-supernode and `flwr supernode register` load.
        key = serialization.load_ssh_private_key(certs.site_key(site).read_bytes(), None)
        pub = serialization.load_ssh_public_key(certs.site_public_key(site).read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert certs.site_public_key(site).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (certs.site_dir(site) / "ca.crt").read_bytes() == certs.ca_cert.read_bytes()
    for private in (certs.ca_key, certs.server_key, certs.site_key("org-a")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = make_certs(tmp_path / "d", ["org-a"])  # another federation: another CA
    other = x509.load_pem_x509_certificate(again.ca_cert.read_bytes())
    with pytest.raises(InvalidSignature):
        server.verify_directly_issued_by(other)


def test_tls_handshake_with_the_server_certificate(tmp_path: Path) -> None:
    """A TLS server with server.pem/server.key; a client trusting only ca.crt connects
    to `localhost` and refuses a name outside the certificate."""
    certs = make_certs(tmp_path / "c", ["org-a"])
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as tls:  # fmt: skip
        assert tls.recv(2) == b"ok"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):  # fmt: skip
        client.wrap_socket(raw, server_hostname="elsewhere.example.org")
    thread.join(5)
    listener.close()


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one site"):
        make_certs(tmp_path / "a", [])
    with pytest.raises(ConfigError, match="given twice"):
        make_certs(tmp_path / "a", ["x", "x"])
    with pytest.raises(ConfigError, match="site name"):
        make_certs(tmp_path / "a", ["../evil"])
    with pytest.raises(ConfigError, match="--host"):
        make_certs(tmp_path / "a", ["x"], ["not a host!"])
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    certs = make_certs(tmp_path / "a", ["x"])
    with pytest.raises(ConfigError, match="--overwrite"):
        make_certs(tmp_path / "a", ["y"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="does not hold fedtune certificates"):
        make_certs(tmp_path / "other", ["y"], overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    add_site(certs.root, "z")
    assert certs.sites == ["x", "z"]
    with pytest.raises(ConfigError, match="already has keys"):
        add_site(certs.root, "z")


def test_certs_command(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c"
    result = runner.invoke(app, ["certs", str(out), "--site", "org-a", "--site", "org-b"])
    assert result.exit_code == 0, result.output
    assert "site org-b" in result.output and (out / "sites" / "org-b" / "auth.key").is_file()
    result = runner.invoke(app, ["certs", str(out), "--site", "org-c", "--add-site"])
    assert result.exit_code == 0 and (out / "sites" / "org-c" / "auth.key.pub").is_file()
    result = runner.invoke(app, ["certs", str(out), "--site", "org-a"])
    assert result.exit_code == 2 and "--overwrite" in result.output
