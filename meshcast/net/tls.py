"""Throw-away TLS identity for a QUIC endpoint.

QUIC requires TLS 1.3, and TLS requires the server to present a certificate. meshcast does not
use that certificate for trust: content is authenticated end to end (the seed signs every chunk,
the tracker signs admission tokens), so each endpoint simply generates a fresh self-signed
certificate in memory when it starts and clients do not verify it (see `meshcast.net.quic`).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_certificate(
    common_name: str = "meshcast",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a new ECDSA P-256 key and a self-signed certificate for it, valid for ten days.

    P-256 rather than Ed25519 because every TLS 1.3 stack (aioquic's included) accepts it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=10))
        .sign(key, hashes.SHA256())
    )
    return certificate, key
