"""Test credentials for TLS on the peer link: x509 directories in QEMU's
tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem,
client-cert.pem, client-key.pem), good ones and bad ones (expired, signed by
an unknown CA, naming another address), and nbdkit --tls-psk files. Made
with Python's cryptography package (Debian's python3-cryptography)."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import lmtest

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path, key):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_cert(path, cert):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A certificate authority that signs peer certificates."""

    def __init__(self, cn="livemig test CA"):
        self.key = _key()
        self.name = _name(cn)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def sign(self, cn, ips=("127.0.0.1",), not_before=None, not_after=None, signer=None):
        """A certificate for `cn` naming `ips`, valid now unless dates are
        given; signed by this CA (or self-signed with signer="self")."""
        key = _key()
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 30 * DAY)
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if signer == "self":
            cert = builder.issuer_name(_name(cn)).sign(key, hashes.SHA256())
        else:
            cert = builder.issuer_name(self.name).sign(self.key, hashes.SHA256())
        return key, cert

    def directory(self, name="x509", ips=("127.0.0.1",), **bad):
        """A credentials directory: server and client certificates for
        `ips`. `bad` (not_before/not_after dates, signer="self") applies to
        both."""
        d = os.path.join(lmtest.tmp_dir(name), "creds")
        os.makedirs(d)
        _write_cert(os.path.join(d, "ca-cert.pem"), self.cert)
        for role in ("server", "client"):
            key, cert = self.sign(f"livemig {role}", ips, **bad)
            _write_key(os.path.join(d, f"{role}-key.pem"), key)
            _write_cert(os.path.join(d, f"{role}-cert.pem"), cert)
        return d


def psk_file(identity="livemig", key_hex=None, mode=0o600, text=None):
    """An nbdkit --tls-psk file (IDENTITY:HEX), or `text` as it is."""
    path = os.path.join(lmtest.tmp_dir("psk"), "keys.psk")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text is not None else f"{identity}:{key_hex or os.urandom(32).hex()}\n")
    os.chmod(path, mode)
    return path
