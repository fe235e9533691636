"""The image manifest: what ``manifest.toml`` declares, validated strictly, and the image error.

An image says what it runs and the least it needs in a ``manifest.toml`` at its top: the
workload's argv (``entry``), its environment and free-form parameters, and its minimum CPUs and
memory. ``parse_manifest`` takes the text (``_image`` reads it out of the verified payload, so
this module never touches a file) and returns a frozen ``Manifest``, or raises ``ImageError``
naming the key and what it should be: an unknown key is refused rather than ignored, so a typo
cannot silently drop a requirement. ``ImageError`` (the image's own errors; a bad signature is a
``SignatureError``) lives here, with the first code that raises it, so ``_image`` builds on this
module and not the other way round.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Final

from multikernel.protocol import NotFoundError, RefusedError

MANIFEST_NAME: Final = "manifest.toml"
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE: Final = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_FIELDS: Final = ("name", "version", "entry", "env", "parameters", "min_cpus", "min_memory")


class ImageError(RefusedError):
    """An image is unreadable, its manifest invalid, or its contents unsafe to unpack."""


class ImageNotFoundError(NotFoundError, ImageError):
    """There is no image at the path given."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.toml`` declares: the workload and the least it needs to run."""

    name: str
    version: str
    entry: tuple[str, ...]  # argv of the workload, run inside the instance
    env: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # free-form, passed to the workload
    min_cpus: int = 1
    min_memory: int = 0  # bytes; 0 means no requirement


def parse_manifest(text: str) -> Manifest:
    """Validate ``manifest.toml`` strictly; every error names the key and what it should be."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"{MANIFEST_NAME} is not valid TOML: {exc}") from None
    if unknown := sorted(raw.keys() - set(_FIELDS)):
        raise ImageError(f"{MANIFEST_NAME}: unknown keys {unknown}; the keys are {list(_FIELDS)}")
    name, version = raw.get("name"), raw.get("version")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad("name", "a string of letters, digits, '.', '_' or '-' (at most 64)")
    if (
        not isinstance(version, str)
        or not version
        or len(version) > 64
        or version != version.strip()
    ):
        raise _bad("version", 'a non-empty string such as "1.2.0"')
    entry = raw.get("entry")
    if not isinstance(entry, list) or not entry or not all(isinstance(a, str) for a in entry):
        raise _bad("entry", 'the workload\'s argv, a non-empty list of strings: ["/bin/app", "-v"]')
    if not entry[0]:
        raise _bad("entry", "a list whose first item (the program) is not empty")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(
        _ENV_KEY.fullmatch(k) and isinstance(v, str) for k, v in env.items()
    ):
        raise _bad("env", 'a table of NAME = "value" strings')
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _bad("parameters", "a table")
    min_cpus = raw.get("min_cpus", 1)
    if type(min_cpus) is not int or min_cpus < 1:
        raise _bad("min_cpus", "an integer of at least 1")
    return Manifest(
        name=name,
        version=version,
        entry=tuple(entry),
        env=dict(env),
        parameters=parameters,
        min_cpus=min_cpus,
        min_memory=parse_size(raw.get("min_memory", 0), key="min_memory"),
    )


def parse_size(value: object, *, key: str = "size") -> int:
    """Bytes from an integer or a string like "64M", "1G", "512KiB" (binary units)."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(match[1]) << (10 * " KMGT".index(match[2].upper() or " "))
    raise _bad(key, 'a size in bytes or with a unit, such as "64M" or "1G"')


def _bad(key: str, expected: str) -> ImageError:
    return ImageError(f"{MANIFEST_NAME}: {key!r} must be {expected}")
