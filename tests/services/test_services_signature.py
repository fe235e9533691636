"""Appended signatures: the kernel's module-signature format, made and checked as sign-file does."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multikernel.protocol import MultikernelError
from multikernel.services._signature import (
    MAGIC,
    PKEY_ID_PKCS7,
    TRAILER,
    BadSignatureError,
    MalformedSignatureError,
    SignatureError,
    UnsignedImageError,
    UntrustedSignerError,
    is_signed,
    make_signing_key,
    sign,
    split,
    verify,
)

DATA = b"\x7fELF payload " * 300
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[bytes, bytes]:
    return make_signing_key("multikernel test signer", algorithm="rsa2048")


@pytest.fixture(scope="module")
def ec_pair() -> tuple[bytes, bytes]:
    return make_signing_key("multikernel ec signer", algorithm="ec-p256")


@pytest.fixture(scope="module")
def signed(rsa_pair: tuple[bytes, bytes]) -> bytes:
    return sign(DATA, *rsa_pair)


def _trailer(pkcs7: bytes) -> bytes:
    return pkcs7 + TRAILER.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(pkcs7)) + MAGIC


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def test_round_trip_names_the_signer(signed: bytes, rsa_pair: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(rsa_pair[1])
    signer = verify(signed, [rsa_pair[1]])
    assert signer.subject == "CN=multikernel test signer"
    assert signer.serial == cert.serial_number
    assert signer.hash == "sha256"
    assert signer.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("hash_name", ["sha384", "sha512"])
def test_ecdsa_and_other_hashes_round_trip(ec_pair: tuple[bytes, bytes], hash_name: str) -> None:
    assert verify(sign(DATA, *ec_pair, hash=hash_name), [ec_pair[1]]).hash == hash_name


def test_trusted_certificates_may_be_der_or_a_pem_bundle(
    signed: bytes, rsa_pair: tuple[bytes, bytes], ec_pair: tuple[bytes, bytes]
) -> None:
    der = x509.load_pem_x509_certificate(rsa_pair[1]).public_bytes(serialization.Encoding.DER)
    assert verify(signed, [der]).subject == "CN=multikernel test signer"
    assert verify(signed, [ec_pair[1] + rsa_pair[1]]).subject == "CN=multikernel test signer"


def test_trailer_layout_is_sign_files(signed: bytes) -> None:
    """data | PKCS#7 | algo hash id_type signer_len key_id_len pad[3] be32 sig_len | magic."""
    assert signed.startswith(DATA)
    assert signed.endswith(b"~Module signature appended~\n")
    header = signed[-len(MAGIC) - 12 : -len(MAGIC)]
    sig_len = len(signed) - len(DATA) - 12 - len(MAGIC)
    assert header == bytes([0, 0, 2, 0, 0, 0, 0, 0]) + sig_len.to_bytes(4, "big")
    data, pkcs7, info = split(signed)
    assert (data, info.sig_len, info.id_type) == (DATA, sig_len, PKEY_ID_PKCS7)
    assert pkcs7[:1] == b"\x30"
    assert is_signed(signed)
    assert not is_signed(DATA)


def test_untrusted_signer_is_refused(signed: bytes, ec_pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(UntrustedSignerError, match="add the signer's certificate"):
        verify(signed, [ec_pair[1]])


def test_no_trusted_certificates_trusts_nobody(signed: bytes) -> None:
    with pytest.raises(UntrustedSignerError):
        verify(signed, [])


def test_unsigned_data_is_refused(rsa_pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(UnsignedImageError, match="mkctl image sign"):
        verify(DATA, [rsa_pair[1]])


def test_flipped_payload_byte_is_a_bad_signature(
    signed: bytes, rsa_pair: tuple[bytes, bytes]
) -> None:
    with pytest.raises(BadSignatureError, match="does not match its signature"):
        verify(_flip(signed, 100), [rsa_pair[1]])


def test_flipped_signature_value_byte_is_a_bad_signature(
    signed: bytes, rsa_pair: tuple[bytes, bytes]
) -> None:
    last_signature_byte = len(signed) - len(MAGIC) - 12 - 1
    with pytest.raises(BadSignatureError):
        verify(_flip(signed, last_signature_byte), [rsa_pair[1]])


@pytest.mark.parametrize("offset", range(12))
def test_flipped_trailer_header_byte_is_refused(
    signed: bytes, rsa_pair: tuple[bytes, bytes], offset: int
) -> None:
    with pytest.raises(BadSignatureError):
        verify(_flip(signed, len(signed) - len(MAGIC) - 12 + offset), [rsa_pair[1]])


def test_flipped_magic_byte_reads_as_unsigned(signed: bytes, rsa_pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(UnsignedImageError, match="damaged"):
        verify(_flip(signed, len(signed) - 5), [rsa_pair[1]])


def test_signature_errors_are_multikernel_errors() -> None:
    for error in (UnsignedImageError, BadSignatureError, UntrustedSignerError):
        assert issubclass(error, SignatureError)
    assert issubclass(MalformedSignatureError, BadSignatureError)
    assert issubclass(SignatureError, MultikernelError)


def test_key_that_does_not_match_the_certificate_refuses_to_sign(
    rsa_pair: tuple[bytes, bytes], ec_pair: tuple[bytes, bytes]
) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        sign(DATA, rsa_pair[0], ec_pair[1])


def test_unknown_hash_refuses_to_sign(rsa_pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(SignatureError, match="unsupported hash"):
        sign(DATA, *rsa_pair, hash="md5")


@fuzz
@given(st.binary(max_size=600))
def test_split_of_random_input_raises_only_signature_errors(blob: bytes) -> None:
    for candidate in (
        blob,
        blob + MAGIC,
        blob + TRAILER.pack(0, 0, 2, 0, 0, len(blob) // 2) + MAGIC,
    ):
        with contextlib.suppress(SignatureError):
            split(candidate)


@fuzz
@given(st.data())
def test_truncated_or_mutated_signatures_raise_only_signature_errors(
    signed: bytes, rsa_pair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    tail = len(signed) - len(DATA)
    cut = data.draw(st.integers(0, len(signed) - 1))
    index = data.draw(st.integers(len(DATA), len(signed) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = signed[:index] + bytes([value]) + signed[index + 1 :]
    for candidate in (signed[:cut], signed[cut:], mutated, signed[-tail:]):
        with contextlib.suppress(SignatureError):
            verify(candidate, [rsa_pair[1]])


@fuzz
@given(st.binary(max_size=400))
def test_random_pkcs7_raises_only_signature_errors(
    rsa_pair: tuple[bytes, bytes], blob: bytes
) -> None:
    with pytest.raises(SignatureError):
        verify(DATA + _trailer(b"\x30" + bytes([min(len(blob), 127)]) + blob), [rsa_pair[1]])


def _openssl(*args: str | Path) -> bytes:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True).stdout


@pytest.fixture
def files(tmp_path: Path, rsa_pair: tuple[bytes, bytes]) -> Path:
    (tmp_path / "key.pem").write_bytes(rsa_pair[0])
    (tmp_path / "cert.pem").write_bytes(rsa_pair[1])
    (tmp_path / "data").write_bytes(DATA)
    return tmp_path


@needs_openssl
def test_pkcs7_is_byte_identical_to_openssl_with_sign_files_flags(
    files: Path, signed: bytes
) -> None:
    """sign-file asks for CMS NOCERTS|BINARY|DETACHED|NOSMIMECAP|NOATTR; RSA is deterministic."""
    reference = _openssl(
        "cms", "-sign", "-binary", "-noattr", "-nocerts", "-nosmimecap", "-md", "sha256",
        "-signer", files / "cert.pem", "-inkey", files / "key.pem", "-outform", "DER",
        "-in", files / "data",
    )  # fmt: skip
    assert split(signed)[1] == reference


@needs_openssl
def test_openssl_verifies_our_signature(files: Path, signed: bytes) -> None:
    (files / "sig.p7").write_bytes(split(signed)[1])
    _openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", files / "sig.p7",
        "-content", files / "data", "-certfile", files / "cert.pem",
        "-CAfile", files / "cert.pem", "-out", files / "out",
    )  # fmt: skip
    assert (files / "out").read_bytes() == DATA


@needs_openssl
@pytest.mark.parametrize(
    "extra", [["-noattr", "-keyid"], ["-md", "sha384"]], ids=["ski-signer", "signed-attributes"]
)
def test_we_verify_openssl_cms_variants(
    files: Path, rsa_pair: tuple[bytes, bytes], extra: list[str]
) -> None:
    """sign-file -k names the signer by key id; the ML-DSA path of sign-file keeps attributes."""
    pkcs7 = _openssl(
        "cms", "-sign", "-binary", "-nocerts", "-nosmimecap", *extra,
        "-signer", files / "cert.pem", "-inkey", files / "key.pem", "-outform", "DER",
        "-in", files / "data",
    )  # fmt: skip
    assert verify(DATA + _trailer(pkcs7), [rsa_pair[1]]).subject == "CN=multikernel test signer"
    with pytest.raises(BadSignatureError):
        verify(_flip(DATA, 0) + _trailer(pkcs7), [rsa_pair[1]])
