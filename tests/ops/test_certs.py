"""The federation's CA, server certificate and site keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedlens.ops.certs import CertError, CertPaths, add_site, init_ca, issue_server_cert, parse_server_names
from fedlens.ops.superlink import check_certificates


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_ca_and_a_server_certificate_for_every_name(tmp_path):
    paths = init_ca(tmp_path / "c", ["fl.example.org", "10.0.0.5", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]  # + loopback for tools on the host
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    assert check_certificates(paths.root) == ["fl.example.org", "localhost", "10.0.0.5", "127.0.0.1"]


def test_existing_keys_are_never_overwritten_without_force(tmp_path):
    paths = init_ca(tmp_path, ["localhost"])
    before = paths.ca_key.read_bytes()
    with pytest.raises(CertError, match="--force"):
        init_ca(tmp_path, ["localhost"])
    assert paths.ca_key.read_bytes() == before
    init_ca(tmp_path, ["localhost"], force=True)
    assert paths.ca_key.read_bytes() != before and _mode(paths.ca_key) == 0o600

    private, public = add_site(tmp_path, "clinic-1")
    key = private.read_bytes()
    with pytest.raises(CertError, match="--force"):
        add_site(tmp_path, "clinic-1")
    assert private.read_bytes() == key


def test_site_key_is_an_openssh_p384_pair(tmp_path):
    private, public = add_site(tmp_path, "store-7")
    assert _mode(private) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
    assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
    assert public.read_text().endswith(" store-7\n")


@pytest.mark.parametrize("bad", ["", "a b", "../x", "-lead", "x" * 65])
def test_bad_site_names_are_refused(tmp_path, bad):
    with pytest.raises(CertError, match="site name"):
        add_site(tmp_path, bad)


def test_server_names_must_be_names_or_addresses():
    assert parse_server_names("a.example.org, 10.1.2.3") == ["a.example.org", "10.1.2.3"]
    for bad in ("", " , ", "not a name", "https://x.org"):
        with pytest.raises(CertError):
            parse_server_names(bad)


def test_serving_checks_catch_expired_and_mismatched_files(tmp_path):
    paths = init_ca(tmp_path / "a", ["localhost"])
    issue_server_cert(paths, ["localhost"], days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), force=True)
    with pytest.raises(CertError, match="not now"):
        check_certificates(paths.root)
    other = init_ca(tmp_path / "b", ["localhost"])
    other.server_key.write_bytes(CertPaths(tmp_path / "a").server_key.read_bytes())
    with pytest.raises(CertError, match="is not the key of"):
        check_certificates(other.root)
    with pytest.raises(CertError, match="not found"):
        check_certificates(tmp_path / "missing")
