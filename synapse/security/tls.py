"""TLS for the HTTP API: the client side (every caller verifies a node against the cluster's
CA, and presents its own certificate where nodes require one) and ``synapse tls init``, which
makes a CA and a certificate per node so that TLS is one step to turn on.

The server side is the Rust front (rust/front/src/tls.rs): it reads the same PEM files.
A node's certificate serves both ways — it is the node's server certificate and the client
certificate it presents when it calls another node (repair, catch-up, confirmations) — so
``tls init`` gives every node certificate both the serverAuth and clientAuth usages.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

CA_CERT, CA_KEY = "ca.crt", "ca.key"


class TlsError(ValueError):
    """A TLS file is missing or unusable; the message names it and the fix."""


def _readable(what: str, path: Path) -> Path:
    if not path.is_file():
        raise TlsError(f"{what} {path} does not exist (make one with `synapse tls init`)")
    return path


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A context that verifies servers against ``ca`` (the system's roots when None) and
    presents ``cert``/``key`` to servers that ask for a client certificate."""
    if (cert is None) != (key is None):
        raise TlsError("a client certificate needs both --tls-cert and --tls-key")
    try:
        ctx = ssl.create_default_context(cafile=str(_readable("the TLS CA", ca)) if ca else None)
    except ssl.SSLError as e:
        raise TlsError(f"the TLS CA {ca} is not a PEM certificate: {e}") from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(_readable("the TLS certificate", cert)), str(_readable("the TLS key", key)))
        except ssl.SSLError as e:
            raise TlsError(f"the TLS key {key} does not fit the certificate {cert}, or one is not PEM: {e}") from None
    return ctx


@dataclass(frozen=True)
class PeerAccess:
    """How a node calls the other nodes' APIs (repair, catch-up, confirmations): with its own
    token, never the root token, and over HTTPS when the cluster serves it."""

    token: str
    ssl: ssl.SSLContext | None = None

    def url(self, api: str) -> str:
        return f"{'https' if self.ssl else 'http'}://{api}"

    def session(self, timeout: float):
        import aiohttp

        return aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl else True),
        )


# --- synapse tls init ---------------------------------------------------------------------


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Synapse"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _subject_names(names: list[str]):
    from cryptography import x509

    out = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def init_certificates(out: Path, nodes: list[str], hosts: list[str], days: int = 825) -> dict[str, Path]:
    """Makes (or reuses) a CA in ``out`` and a certificate and key per node, valid for the node
    id, ``hosts`` (names or IP addresses), localhost and 127.0.0.1. Returns the files made.
    An existing CA is kept, so nodes can be added later; an existing node certificate is
    replaced."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    made: dict[str, Path] = {}
    ca_cert_path, ca_key_path = out / CA_CERT, out / CA_KEY
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Synapse cluster CA")).issuer_name(_name("Synapse cluster CA"))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        made["ca"] = ca_cert_path
    for node in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        names = list(dict.fromkeys([node, *hosts, "localhost", "127.0.0.1"]))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(node)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_subject_names(names)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(out / f"{node}.key", key)
        (out / f"{node}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        made[node] = out / f"{node}.crt"
    return made
