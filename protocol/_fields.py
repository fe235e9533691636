"""Integer field types with their wire widths, shared by every message module.

msgpack integers carry no width; these annotations make a decoder refuse a value that would not
fit the C field it mirrors (a negative CPU id, a PCI bus number above 255) instead of letting it
reach code that assumes the range.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import msgspec

U8: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
U64: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]  # msgpack itself caps integers at 2**64-1
I32: TypeAlias = Annotated[int, msgspec.Meta(ge=-0x8000_0000, le=0x7FFF_FFFF)]
I64: TypeAlias = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: A subject, pattern or name as carried inside a body (the grammar is checked by the hub).
ShortStr: TypeAlias = Annotated[str, msgspec.Meta(max_length=255)]
