"""A federation's keys: a CA, the server's TLS certificate, and one key pair per site.

Layout of a certificate folder (``fedlens certs init --out DIR``)::

    DIR/ca.pem          CA certificate: every site gets a copy (--ca)
    DIR/ca.key          CA private key (0600): stays with whoever issues certificates
    DIR/server.pem      server certificate, SANs = the names/addresses sites dial
    DIR/server.key      server private key (0600)
    DIR/sites/SITE.key  a site's authentication key (OpenSSH, 0600): goes to that site only
    DIR/sites/SITE.pub  its public half: registered at the server (fedlens server add-site)

Site keys are EC P-384 in OpenSSH format, which is what Flower's SuperNode
authentication reads. Private keys are created with mode 0600 from the start (never
world-readable, not even briefly) and are never overwritten without ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedlens.shared.errors import FedlensError

__all__ = ["CertError", "CertPaths", "init_ca", "add_site", "issue_server_cert", "site_key_paths", "parse_server_names"]

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_DAYS = 825
LOCAL_NAMES = ("localhost", "127.0.0.1")  # the longest validity browsers and most TLS stacks accept for a leaf


class CertError(FedlensError):
    """A certificate or key could not be created, read or used."""


@dataclass(frozen=True)
class CertPaths:
    """The files of one certificate folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def sites(self) -> Path:
        return self.root / "sites"


def site_key_paths(out: str | Path, site: str) -> tuple[Path, Path]:
    """``(private, public)`` key files of ``site`` under the certificate folder ``out``."""
    check_site_name(site)
    sites = CertPaths(Path(out)).sites
    return sites / f"{site}.key", sites / f"{site}.pub"


def check_site_name(site: str) -> str:
    """Return ``site`` if it is a usable site name, else raise :class:`CertError`."""
    if not SITE_NAME.match(site):
        raise CertError(f"invalid site name {site!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return site


def parse_server_names(text: str) -> list[str]:
    """Split ``--server-name`` (comma-separated DNS names and/or IP addresses)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CertError("--server-name needs at least one DNS name or IP address that sites will dial, e.g. fl.example.org,10.0.0.5")
    for name in names:
        if _as_ip(name) is None and not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$", name):
            raise CertError(f"--server-name {name!r} is neither a DNS name nor an IP address")
    return names


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Create ``path`` with mode 0600 (atomically when replacing with ``force``)."""
    if path.exists() and not force:
        raise CertError(f"{path} already exists; refusing to overwrite a private key (pass --force to replace it)")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(
    out: str | Path,
    server_names: list[str],
    *,
    days: int = DEFAULT_DAYS,
    common_name: str = "fedlens federation CA",
    force: bool = False,
) -> CertPaths:
    """Create a CA and a server certificate for ``server_names`` in ``out``.

    Parameters
    ----------
    out : path-like
        Certificate folder (created; existing keys are kept unless ``force``).
    server_names : list of str
        DNS names and IP addresses sites will dial; each becomes a SAN.
    days : int
        Validity of both certificates.
    force : bool
        Replace existing keys (sites must then get the new ``ca.pem``).

    Raises
    ------
    CertError
        When a key exists and ``force`` is false, or a name is invalid.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    paths = CertPaths(Path(out))
    for key in (paths.ca_key, paths.server_key):
        if key.exists() and not force:
            raise CertError(f"{key} already exists; refusing to overwrite a private key (pass --force to replace the CA and server keys)")
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    paths.root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(
        paths.ca_key,
        ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        force=force,
    )
    _write_public(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    # The server host's own tools (`fedlens server add-site`, `fedlens run` on the host) dial
    # loopback, so loopback names are always covered too.
    names = [*server_names, *(n for n in LOCAL_NAMES if n not in server_names)]
    issue_server_cert(paths, names, days=days, force=True)  # checked above
    return paths


def issue_server_cert(
    paths: CertPaths,
    server_names: list[str],
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    force: bool = False,
) -> None:
    """(Re-)issue ``server.pem``/``server.key`` signed by the folder's CA.

    ``not_before`` exists to test expired certificates; leave it unset.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not paths.ca_key.is_file() or not paths.ca_cert.is_file():
        raise CertError(f"no CA in {paths.root}; create one with `fedlens certs init --out {paths.root} --server-name ...`")
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for n in server_names:
        ip = _as_ip(n)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(n))
    start = not_before or (_now() - dt.timedelta(minutes=5))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    _write_private(
        paths.server_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        force=force,
    )
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def add_site(out: str | Path, site: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create ``site``'s authentication key pair under ``out/sites``.

    Returns
    -------
    (Path, Path)
        The private key (send to the site only) and the public key (register it
        with ``fedlens server add-site``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = site_key_paths(out, site)
    if private.exists() and not force:
        raise CertError(
            f"{private} already exists; refusing to overwrite {site}'s key (pass --force to replace it, then re-register the site)"
        )
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        force=force,
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public, pub + f" {site}\n".encode())
    return private, public
