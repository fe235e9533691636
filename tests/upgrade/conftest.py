"""Fixtures of the upgrade tests that run a real host: a signing key and its trusted cert."""

from __future__ import annotations

from pathlib import Path

import pytest

from multikernel.services._signature import make_signing_key


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return make_signing_key("upgrade tests", algorithm="ec-p256")


@pytest.fixture
def cert(tmp_path: Path, keys: tuple[bytes, bytes]) -> Path:
    path = tmp_path / "cert.pem"
    path.write_bytes(keys[1])
    return path
