"""TLS for DICOM associations (PS3.15 B.1 with the BCP 195 profile, as dcmtk's default ``+py``): TLS 1.2 or
newer, forward-secret AEAD cipher suites only, certificates checked against a CA the site names."""

from __future__ import annotations

import ssl
from pathlib import Path

from ichdet.errors import ConfigError

__all__ = ["BCP195_CIPHERS", "client_context", "server_context"]

#: BCP 195 (RFC 9325 section 4.2) recommended TLS 1.2 suites, in OpenSSL's names; TLS 1.3 suites are all allowed.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])


def _context(protocol: ssl._SSLMethod, cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)  # no system CAs: only the site's CA vouches for a caller
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        if cert is not None:
            context.load_cert_chain(cert, key)
        if ca is not None:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as err:
        names = ", ".join(str(p) for p in (cert, key, ca) if p is not None)
        raise ConfigError(f"TLS: cannot load {names}: {getattr(err, 'strerror', None) or err} "
                          "(PEM files: tls_cert, tls_key without a passphrase, tls_ca)") from None
    return context


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """The listening side: our certificate and key; with ``ca``, every caller must present a certificate
    signed by it (otherwise the handshake fails and no association is made)."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
    context.verify_mode = ssl.CERT_REQUIRED if ca is not None else ssl.CERT_NONE
    return context


def client_context(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """The sending side: the destination's certificate is checked against ``ca`` (the system's CAs when
    None) and its host name; our certificate is presented when the destination asks for one."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)  # checks the host name and the chain
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context
