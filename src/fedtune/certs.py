"""`fedtune certs`: the key material of a federation on Flower's Deployment Engine,
made with the `cryptography` package.

    OUT/
      ca/ca.crt                 the federation's root certificate: give it to every party
      ca/ca.key                 the CA's private key (0600): keep it offline, it signs
      server/server.pem         the SuperLink's TLS certificate (SAN: the given hosts and
                                localhost, 127.0.0.1, ::1 for the operator's own tools)
      server/server.key         its private key (0600)
      server/ca.crt             copy of the root, for `flower-superlink --ssl-ca-certfile`
      sites/<site>/auth.key     the site's SuperNode authentication key (OpenSSH, 0600)
      sites/<site>/auth.key.pub its public key: the server registers it
                                (`flwr supernode register`); a site not registered is refused
      sites/<site>/ca.crt       copy of the root, for `flower-supernode --root-certificates`

Formats are what Flower 1.41 accepts (verified on loopback): TLS keys EC P-256 in
PKCS8 PEM (the SuperLink serves HTTPS through uvicorn, clients are httpx: any key
Python's `ssl` loads); SuperNode authentication keys EC P-384 in OpenSSH format
(`flower-supernode --auth-supernode-private-key` loads them with
`load_ssh_private_key` and wants a NIST-curve EC key; `flwr supernode register`
wants `ecdsa-sha2-nistp*` public keys). Everything is written to a staging folder
and renamed into place, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class FederationCerts:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def site_key(self, site: str) -> Path:
        return self.site_dir(site) / "auth.key"

    def site_public_key(self, site: str) -> Path:
        return self.site_dir(site) / "auth.key.pub"

    @property
    def sites(self) -> list[str]:
        folder = self.root / "sites"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _check_sites(sites: list[str]) -> None:
    if not sites:
        raise ConfigError("give at least one site (--site NAME, repeatable)")
    for s in sites:
        if not _SITE_NAME.match(s):
            raise ConfigError(f"site name {s!r}: use letters, digits, '.', '_' or '-' "
                              "(at most 63 characters, not starting with a symbol)")  # fmt: skip
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ConfigError(f"site name(s) given twice: {', '.join(dup)}")


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", h):
                raise ConfigError(f"--host {h!r} is neither an IP address nor a DNS name; "
                                  "give the address the sites will connect to") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _site_keys(certs: FederationCerts, site: str) -> None:
    """An EC P-384 key pair in OpenSSH format: Flower's SuperNode authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(certs.site_key(site), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)  # fmt: skip
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)  # fmt: skip
    _write(certs.site_public_key(site), pub + f" fedtune-site-{site}\n".encode())
    shutil.copy(certs.ca_cert, certs.site_dir(site) / "ca.crt")


def make_certs(out: str | Path, sites: list[str], hosts: list[str] | None = None,
               days: int = 365, overwrite: bool = False) -> FederationCerts:  # fmt: skip
    """A new CA, a server certificate for `hosts` and one authentication key pair
    per site, in `out` (see the module docstring for the layout)."""
    _check_sites(sites)
    # Loopback names always: `fedtune server` registers the sites over 127.0.0.1.
    hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    san = _san(hosts)
    if days < 1:
        raise ConfigError(f"--days {days}: certificates must be valid for at least a day")
    final = Path(out)
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise ConfigError(f"{final} already exists and is not empty; choose another folder "
                              "or pass --overwrite (the old keys stop working)")  # fmt: skip
        if not (final / "ca" / "ca.crt").is_file():
            raise ConfigError(f"{final} does not hold fedtune certificates; --overwrite replaces "
                              "only those: choose another folder")  # fmt: skip
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        certs = FederationCerts(staging)
        now = datetime.datetime.now(datetime.UTC)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune federation"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        _write(certs.ca_key, _pkcs8(ca_key), private=True)
        _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))

        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(srv_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        _write(certs.server_key, _pkcs8(srv_key), private=True)
        _write(certs.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM))
        shutil.copy(certs.ca_cert, certs.server_cert.parent / "ca.crt")
        for site in sites:
            _site_keys(certs, site)
        if final.exists():
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FederationCerts(final)


def add_site(out: str | Path, site: str) -> FederationCerts:
    """A key pair for one more site in an existing certificate folder."""
    certs = FederationCerts(Path(out))
    if not certs.ca_cert.is_file():
        raise ConfigError(f"{out} holds no fedtune certificates; make them with `fedtune certs`")
    _check_sites([site])
    if certs.site_dir(site).exists():
        raise ConfigError(f"site {site!r} already has keys in {certs.site_dir(site)}")
    try:
        _site_keys(certs, site)
    except BaseException:
        shutil.rmtree(certs.site_dir(site), ignore_errors=True)
        raise
    return certs
