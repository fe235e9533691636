"""Appended signatures in the kernel's own module-signature format, as ``scripts/sign-file`` writes.

A signed blob is the payload, then a DER PKCS#7 (CMS) ``SignedData`` detached over the payload,
then the 12-byte ``struct module_signature`` (only ``id_type`` = ``PKEY_ID_PKCS7`` and the
big-endian ``sig_len`` set), then the marker ``~Module signature appended~\\n``. The CMS message is
what ``sign-file`` asks OpenSSL for: no certificates, no signed attributes, no S/MIME
capabilities, the signer named by issuer and serial number, RSA labelled ``rsaEncryption``
(the only RSA label the kernel's PKCS#7 parser takes). ``verify`` accepts what the kernel
accepts, and trusts a signer only when its certificate is one of the trusted certificates
(``sign-file`` embeds no certificates, so there is no chain to walk, as in the kernel). The DER
itself is made and read by the small codec in ``_der``; its errors become
``MalformedSignatureError`` in ``verify_detached``, the one place the message is read.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

import multikernel.services._der as der
from multikernel.protocol import RefusedError

MAGIC: Final = b"~Module signature appended~\n"
PKEY_ID_PKCS7: Final = 2
#: struct module_signature: algo, hash, id_type, signer_len, key_id_len, __pad[3], __be32 sig_len.
TRAILER: Final = struct.Struct(">BBBBB3xI")

_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_DIGEST_OIDS: Final = {
    "sha256": der.oid("2.16.840.1.101.3.4.2.1"),
    "sha384": der.oid("2.16.840.1.101.3.4.2.2"),
    "sha512": der.oid("2.16.840.1.101.3.4.2.3"),
}
_ECDSA_OIDS: Final = {
    "sha256": der.oid("1.2.840.10045.4.3.2"),
    "sha384": der.oid("1.2.840.10045.4.3.3"),
    "sha512": der.oid("1.2.840.10045.4.3.4"),
}
_RSA_OID: Final = der.oid("1.2.840.113549.1.1.1")
_DATA_OID: Final = der.oid("1.2.840.113549.1.7.1")
_SIGNED_DATA_OID: Final = der.oid("1.2.840.113549.1.7.2")
_MESSAGE_DIGEST_OID: Final = der.oid("1.2.840.113549.1.9.4")


class SignatureError(RefusedError):
    """An appended signature could not be made, read or trusted."""


class UnsignedImageError(SignatureError):
    """The data carries no ``~Module signature appended~`` trailer at all."""


class BadSignatureError(SignatureError):
    """A signature is present but does not prove the data: tampered, corrupt or foreign."""


class MalformedSignatureError(BadSignatureError):
    """The trailer or the PKCS#7 message breaks the format (truncated, bad lengths, bad fields)."""


class UntrustedSignerError(SignatureError):
    """The signature names a signer whose certificate is not among the trusted certificates."""


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """The ``struct module_signature`` read from a trailer."""

    algo: int
    hash: int
    id_type: int
    signer_len: int
    key_id_len: int
    sig_len: int


@dataclass(frozen=True, slots=True)
class SignerInfo:
    """Who signed, as proven by ``verify``: the trusted certificate that checked the signature."""

    subject: str
    issuer: str
    serial: int
    fingerprint: str  # sha256 of the certificate's DER, lowercase hex
    hash: str  # the digest algorithm the signature used, e.g. "sha256"


def is_signed(data: bytes) -> bool:
    """True when ``data`` ends with the appended-signature marker (it may still be malformed)."""
    return data.endswith(MAGIC)


def split(signed: bytes) -> tuple[bytes, bytes, SignatureInfo]:
    """Split a signed blob into (payload, PKCS#7 DER, trailer), checking the trailer as the kernel.

    Raises ``UnsignedImageError`` without the marker and ``MalformedSignatureError`` for a trailer
    the kernel's ``mod_check_sig`` would refuse (wrong id_type, non-zero fields, a length that
    leaves no payload).
    """
    if not signed.endswith(MAGIC):
        raise UnsignedImageError(
            "no '~Module signature appended~' trailer: the image is unsigned (or its trailer is "
            "damaged); sign it with `mkctl image sign`, or allow unsigned images on this host"
        )
    end = len(signed) - len(MAGIC) - TRAILER.size
    if end <= 0:
        raise MalformedSignatureError("signature trailer is truncated: no room for its header")
    info = SignatureInfo(*TRAILER.unpack_from(signed, end))
    pad = signed[end + 5 : end + 8]
    if info.id_type != PKEY_ID_PKCS7:
        raise MalformedSignatureError(
            f"signature id_type is {info.id_type}, not PKCS#7 ({PKEY_ID_PKCS7}); re-sign the "
            "image with `mkctl image sign` or scripts/sign-file"
        )
    if info.algo or info.hash or info.signer_len or info.key_id_len or any(pad):
        raise MalformedSignatureError("PKCS#7 signature header has unexpected non-zero fields")
    if info.sig_len == 0 or info.sig_len >= end:
        raise MalformedSignatureError(
            f"signature length {info.sig_len} does not fit the {end} bytes before the trailer "
            "header: the file is truncated or damaged"
        )
    return signed[: end - info.sig_len], signed[end - info.sig_len : end], info


def sign(data: bytes, key_pem: bytes, cert_pem: bytes, *, hash: str = "sha256") -> bytes:
    """Return ``data`` with an appended signature, byte for byte what ``sign-file`` would append.

    ``key_pem`` is an unencrypted RSA or EC private key (PEM or DER); ``cert_pem`` its X.509
    certificate (PEM or DER). ``data`` is signed as given: strip an old signature first.
    """
    if hash not in _HASHES:
        raise SignatureError(f"unsupported hash {hash!r}; choose one of {sorted(_HASHES)}")
    key = _load_key(key_pem)
    cert = load_certificates([cert_pem])[0]
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise SignatureError("the private key does not match the certificate; pass its pair")
    algorithm = _HASHES[hash]()
    digest = _digest(algorithm, data)
    if isinstance(key, rsa.RSAPrivateKey):
        value = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
        sig_algo = der.seq(_RSA_OID, der.NULL)
    else:
        value = key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))
        sig_algo = der.seq(_ECDSA_OIDS[hash])
    digest_algo = der.seq(_DIGEST_OIDS[hash])
    issuer_serial = der.seq(cert.issuer.public_bytes(), der.integer(cert.serial_number))
    signer = der.seq(der.integer(1), issuer_serial, digest_algo, sig_algo, der.octets(value))
    signed_data = der.seq(
        der.integer(1), der.set_of(digest_algo), der.seq(_DATA_OID), der.set_of(signer)
    )
    pkcs7 = der.seq(_SIGNED_DATA_OID, der.tlv(0xA0, signed_data))
    return data + pkcs7 + TRAILER.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(pkcs7)) + MAGIC


def verify(signed: bytes, trusted_certs: Iterable[bytes]) -> SignerInfo:
    """Check the appended signature of ``signed`` against the trusted certificates (PEM or DER).

    Raises ``UnsignedImageError``, ``MalformedSignatureError``, ``BadSignatureError`` (the
    signature does not match the data) or ``UntrustedSignerError``.
    """
    data, pkcs7, _ = split(signed)
    return verify_detached(data, pkcs7, trusted_certs)


def verify_detached(data: bytes, pkcs7: bytes, trusted_certs: Iterable[bytes]) -> SignerInfo:
    """Check a detached PKCS#7 ``SignedData`` (DER) over ``data``; see ``verify``."""
    certs = load_certificates(trusted_certs)
    try:  # every read of the message is here, so the codec's errors become ours once
        hash_name, sid, attrs, sig_algo, value = _parse_signed_data(pkcs7)
        cert = _find_signer(certs, sid)
        claimed = None if attrs is None else _message_digest(attrs)
    except der.DerError as exc:
        raise _malformed(str(exc)) from None
    algorithm = _HASHES[hash_name]()
    digest = _digest(algorithm, data)
    if attrs is not None:
        if claimed != digest:
            raise BadSignatureError("the image does not match its signature (digest differs)")
        signed_bytes = b"\x31" + attrs[1:]  # signed attributes are signed as an explicit SET OF
        digest = _digest(algorithm, signed_bytes)
    key = cert.public_key()
    try:
        if sig_algo == _RSA_OID and isinstance(key, rsa.RSAPublicKey):
            key.verify(value, digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
        elif sig_algo == _ECDSA_OIDS[hash_name] and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(value, digest, ec.ECDSA(utils.Prehashed(algorithm)))
        else:
            raise BadSignatureError("the signature algorithm does not match the signer's key")
    except InvalidSignature:
        raise BadSignatureError(
            "the image does not match its signature: it was modified after signing, or signed "
            "by another key with the same name; re-sign it with `mkctl image sign`"
        ) from None
    return SignerInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        hash=hash_name,
    )


def load_certificates(blobs: Iterable[bytes]) -> list[x509.Certificate]:
    """Read X.509 certificates: each blob is DER, or PEM holding one or more certificates."""
    certs: list[x509.Certificate] = []
    for index, blob in enumerate(blobs):
        try:
            if b"-----BEGIN" in blob:
                certs.extend(x509.load_pem_x509_certificates(blob))
            else:
                certs.append(x509.load_der_x509_certificate(blob))
        except ValueError as exc:
            raise SignatureError(f"certificate #{index} is not a PEM or DER X.509: {exc}") from None
    return certs


def make_signing_key(
    common_name: str, *, algorithm: str = "rsa4096", valid_days: int = 3650
) -> tuple[bytes, bytes]:
    """Make a private key and a self-signed certificate for it, both PEM: (key_pem, cert_pem).

    ``algorithm`` is ``rsa2048``, ``rsa3072``, ``rsa4096`` (the kernel's default signing key) or
    ``ec-p256``/``ec-p384``. The certificate carries the extensions of the kernel's
    ``certs/default_x509.genkey``: not a CA, digitalSignature, subject and authority key ids.
    """
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    match algorithm:
        case "rsa2048" | "rsa3072" | "rsa4096":
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[3:]))
        case "ec-p256":
            key = ec.generate_private_key(ec.SECP256R1())
        case "ec-p384":
            key = ec.generate_private_key(ec.SECP384R1())
        case _:
            raise SignatureError(f"unknown key algorithm {algorithm!r}; try rsa4096 or ec-p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _load_key(blob: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        if b"-----BEGIN" in blob:
            key = serialization.load_pem_private_key(blob, password=None)
        else:
            key = serialization.load_der_private_key(blob, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot read the private key (PEM or DER, unencrypted): {exc}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SignatureError("only RSA and EC keys sign kernel-format signatures")
    return key


def _spki(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(algorithm.name, data).digest()


def _malformed(what: str) -> MalformedSignatureError:
    return MalformedSignatureError(f"the PKCS#7 signature is malformed: {what}")


def _parse_signed_data(blob: bytes) -> tuple[str, bytes, bytes | None, bytes, bytes]:
    """(hash name, signer id TLV, signed attributes TLV or None, signature OID TLV, signature)."""
    outer = der.elements(der.one(blob, 0x30))
    if len(outer) != 2 or outer[0] != _SIGNED_DATA_OID or outer[1][0] != 0xA0:
        raise _malformed("not a PKCS#7 signedData message")
    fields = der.elements(der.one(der.content(outer[1]), 0x30))
    tags = [item[0] for item in fields]
    if len(tags) < 4 or tags[:3] != [0x02, 0x31, 0x30] or tags[-1] != 0x31:
        raise _malformed("signedData does not have the expected fields")
    if not set(tags[3:-1]) <= {0xA0, 0xA1}:
        raise _malformed("signedData has unexpected fields")
    if der.elements(der.content(fields[2])) != [_DATA_OID]:
        raise _malformed("the signature is not detached over plain data (sign-file's form)")
    signers = der.elements(der.content(fields[-1]))
    if len(signers) != 1:
        raise _malformed(f"expected exactly one signer, found {len(signers)}")
    items = der.elements(der.one(signers[0], 0x30))
    if len(items) < 5 or items[0][0] != 0x02 or items[2][0] != 0x30:
        raise _malformed("signerInfo does not have the expected fields")
    sid, digest_algo, rest = items[1], items[2], items[3:]
    attrs = rest.pop(0) if rest[0][0] == 0xA0 else None
    if len(rest) not in (2, 3) or [item[0] for item in rest] != [0x30, 0x04, 0xA1][: len(rest)]:
        raise _malformed("signerInfo does not have the expected fields")
    names = [name for name, oid in _DIGEST_OIDS.items() if oid == der.algorithm(digest_algo)]
    if not names:
        raise _malformed("the digest algorithm is not sha256, sha384 or sha512")
    return names[0], sid, attrs, der.algorithm(rest[0]), der.content(rest[1])


def _find_signer(certs: list[x509.Certificate], sid: bytes) -> x509.Certificate:
    if sid[0] == 0x80:  # [0] subjectKeyIdentifier, as sign-file -k writes
        key_id = der.content(sid)
        for cert in certs:
            try:
                ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            if ext.value.digest == key_id:
                return cert
        wanted = f"key id {key_id.hex()}"
    elif sid[0] == 0x30:  # issuerAndSerialNumber, sign-file's default
        parts = der.elements(der.content(sid))
        if len(parts) != 2 or parts[0][0] != 0x30 or parts[1][0] != 0x02:
            raise _malformed("the signer's issuer and serial number are malformed")
        serial = int.from_bytes(der.content(parts[1]), "big", signed=True)
        for cert in certs:
            if cert.serial_number == serial and cert.issuer.public_bytes() == parts[0]:
                return cert
        wanted = f"serial {serial:x}"
    else:
        raise _malformed("the signer identifier is neither issuer and serial nor key id")
    raise UntrustedSignerError(
        f"the image was signed by a key that is not trusted here ({wanted}); add the signer's "
        "certificate to the trusted keys, or sign the image with a trusted key"
    )


def _message_digest(attrs: bytes) -> bytes:
    for attr in der.elements(der.content(attrs)):
        parts = der.elements(der.one(attr, 0x30))
        if len(parts) == 2 and parts[0] == _MESSAGE_DIGEST_OID and parts[1][0] == 0x31:
            return der.one(der.content(parts[1]), 0x04)
    raise _malformed("signed attributes carry no messageDigest")
