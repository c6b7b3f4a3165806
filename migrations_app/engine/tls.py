"""Throwaway certificates for one run's CRIU TLS connection.

CRIU (criu/tls.c, GnuTLS) makes both ends verify the other's certificate
against the CA given with --tls-cacert, and, unless --tls-no-cn-verify is
given, against the address the *connection* uses (opts.addr): the server
checks the client's certificate against its own --address too. So both
certificates carry that one address as an IP SAN. Each run gets a CA of its
own, whose key never leaves the controller's memory: only the two
certificates it signed for that run are ever trusted by it.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import tarfile
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for the slowest run, short enough to be worthless later; the
# clock skew between hosts is covered by starting an hour back.
VALID_FOR = datetime.timedelta(days=1)
SKEW = datetime.timedelta(hours=1)

CACERT, CERT, KEY = "cacert.pem", "cert.pem", "key.pem"


@dataclass(frozen=True)
class Side:
    """What one host gets: the CA's certificate, its own certificate and key (PEM)."""

    cacert: bytes
    cert: bytes
    key: bytes

    def tar(self) -> bytes:
        """The three files as a tar archive, mode 0600, for `tar -x` on the host."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in ((CACERT, self.cacert), (CERT, self.cert), (KEY, self.key)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to make and to handshake, and every GnuTLS knows it.
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pair(address: str, label: str = "criuweb run") -> tuple[Side, Side]:
    """A fresh CA and (server side, client side) certificates for a connection to address.

    address: the IP the connection is made to (CRIU's --address on both ends).
    """
    ip = ipaddress.ip_address(address)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = _name(f"{label} CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    sides = []
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{label} {role}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        sides.append(Side(ca_pem, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)))
    return sides[0], sides[1]


def criu_args(directory: str) -> list[str]:
    """CRIU's TLS options for the files a Side was unpacked into."""
    d = directory.rstrip("/")
    return ["--tls", "--tls-cacert", f"{d}/{CACERT}", "--tls-cert", f"{d}/{CERT}", "--tls-key", f"{d}/{KEY}"]


# Unpack a Side's tar (stdin) into $1, readable by root alone.
INSTALL_SCRIPT = 'umask 077 && mkdir -p "$1" && chmod 700 "$1" && tar -xf - -C "$1"'


def install(conn, directory: str, side: Side) -> None:
    """Put a Side's files on a host, mode 0600 in a 0700 directory."""
    conn.sh(INSTALL_SCRIPT, directory, input=side.tar())
