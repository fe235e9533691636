"""Every shm test runs twice: on the native ring core and on the pure-Python reference core.

The choice travels in the environment (`MULTIKERNEL_SHM_RING`), so peers spawned by a test use
the same core as the test itself unless the test says otherwise.
"""

from __future__ import annotations

import os

import pytest

from multikernel.shm import native_available
from multikernel.shm._core import ENV

#: What the environment asked for before any test changed it ("python" excuses a missing build).
REQUESTED = os.environ.get(ENV, "")


@pytest.fixture(params=["native", "python"], autouse=True)
def ring_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ring core under test; the native one is required where it was built (see below)."""
    impl: str = request.param
    if impl == "native" and not native_available():
        pytest.skip("the native ring core was not built (test_native_core_is_built says why)")
    monkeypatch.setenv(ENV, impl)
    return impl
