"""An upgradable key-value workload in two versions, to try upgrades with (tests, benchmarks).

`KV_WORKLOAD` is the source of a workload that serves the well-known name `kv` (`put [key,
value]`, `get key`, `count`, `version`, `slow seconds`) and keeps its store and a counter across
upgrades through `UpgradeControl`. Version 1 writes the store as `StoreV1` (key -> value);
version 2 reads it through a transform into `StoreV2` (key -> Entry(value, length)), the schema
change an upgrade must carry. `kv_image(directory, version, ...)` writes an image of it (sign it
before loading, as any image: `mkctl image sign`). Its manifest parameters:

- `mode`: `crash` (exits at start), `unhealthy` (its health check says no), `reject` (version 2
  with no transform from version 1: refuses version 1 state);
- `names`: the names it serves instead of `kv`; `per_instance`: it serves `kv.<deployment>`, the
  instance's name without an `-r<N>` suffix, so one image serves several instances under names
  of their own;
- `health_after`: seconds during which its health check says no.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Final

KV_WORKLOAD: Final = """
import json, os, re, sys
import anyio, msgspec
from multikernel.endpoints import connect, runtime
from multikernel.upgrade import IncompatibleStateError, PreservedState, Schema, UpgradeControl

VERSION = int(os.environ["KV_VERSION"])
PARAMS = json.loads(os.environ.get("MULTIKERNEL_PARAMETERS") or "{}")
MODE = PARAMS.get("mode", "")
NAMES = PARAMS.get("names", ["kv"])
if PARAMS.get("per_instance"):  # one name per deployment: kv.<first instance's name>
    NAMES = ["kv." + re.sub(r"-r[0-9]+$", "", os.environ["MULTIKERNEL_INSTANCE_NAME"])]

class StoreV1(msgspec.Struct):
    items: dict[str, str]

class Entry(msgspec.Struct):
    value: str
    length: int

class StoreV2(msgspec.Struct):
    items: dict[str, Entry]

class Counter(msgspec.Struct):
    value: int

def v1_to_v2(old):
    return {"items": {k: {"value": v, "length": len(v)} for k, v in old["items"].items()}}

if VERSION == 1:
    STORE = Schema(StoreV1, 1)
elif MODE == "reject":
    STORE = Schema(StoreV2, 2)  # no transform from version 1: refuses it
else:
    STORE = Schema(StoreV2, 2, {1: v1_to_v2})
COUNTER = Schema(Counter, 1)

items = {}
count = Counter(0)

def value_of(entry):
    return entry if VERSION == 1 else entry.value

def save():
    state = PreservedState()
    state.put("kv/store", (StoreV1 if VERSION == 1 else StoreV2)(items), version=VERSION)
    state.put("counter", count)
    return state

def load(state):
    global count
    items.update(state.get("kv/store", STORE).items)
    count = state.get("counter", COUNTER)

async def main():
    if MODE == "crash":
        sys.exit("crashing at start, as asked")
    async with connect(name="kv") as ep, anyio.create_task_group() as tg:
        services = [ep.service(name) for name in NAMES]
        for kv in services:
            @kv.method
            async def put(pair: list) -> int:
                key, value = pair
                items[key] = value if VERSION == 1 else Entry(value, len(value))
                count.value += 1
                return count.value

            @kv.method
            async def get(key: str) -> str | None:
                entry = items.get(key)
                return None if entry is None else value_of(entry)

            @kv.method(name="count")
            async def count_value(_: None) -> int:
                return count.value

            @kv.method
            async def version(_: None) -> int:
                return VERSION

            @kv.method
            async def slow(seconds: float) -> int:
                await anyio.sleep(seconds)
                count.value += 1
                return count.value

        born = anyio.current_time()

        def health():
            if anyio.current_time() - born < PARAMS.get("health_after", 0):
                return False
            return MODE != "unhealthy"

        control = UpgradeControl(ep, services, preserve=save, restore=load, health=health)
        await tg.start(control.run)
        for kv in services:
            await kv.start()
        print(f"kv v{VERSION} serving", flush=True)
        await anyio.sleep_forever()

runtime.run(main)
"""


def kv_image(directory: Path, version: int, *, mode: str = "", **parameters: Any) -> Path:
    """Write an (unsigned) image of `KV_WORKLOAD` at `version` into the new `directory`."""
    directory.mkdir()
    values = {"mode": mode, **parameters}
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    (directory / "manifest.toml").write_text(
        f'name = "kv"\nversion = "{version}"\nentry = ["{{python}}", "main.py"]\n'
        f'[env]\nKV_VERSION = "{version}"\n'
        f"[parameters]\n{table}"
    )
    (directory / "main.py").write_text(textwrap.dedent(KV_WORKLOAD))
    return directory
