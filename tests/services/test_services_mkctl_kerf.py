"""mkctl takes kerf's vocabulary where ours differs (docs/platform.md, "mkctl and kerf").

Each kerf verb mkctl aliases is the command of ours it names, each kerf flag parses to what our
own flag does, and `--id N` finds the instance whose id is N on a running host.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from multikernel.endpoints.mkctl._app import cli
from multikernel.endpoints.mkctl._kerf import KERF_VERBS

from .conftest import fails, mkctl

DOCS = Path(__file__).parents[2] / "docs" / "platform.md"


def command(*path: str) -> click.Command:
    ctx = click.Context(cli)
    found = cli.get_command(ctx, path[0])
    assert found is not None, path
    return found


def parsed(verb: str, *args: str) -> dict[str, object]:
    with command(verb).make_context(verb, list(args)) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize(("kerf", "ours"), sorted(KERF_VERBS.items()))
def test_each_kerf_verb_runs_the_verb_it_maps_to(kerf: str, ours: str) -> None:
    assert command(kerf) is command(ours)
    assert kerf not in cli.list_commands(click.Context(cli))  # mkctl --help lists ours


@pytest.mark.parametrize(
    ("verb", "kerf", "ours"),
    [
        ("create", ["web", "-c", "4-7", "-m", "2GB"], ["web", "--cpus", "@4-7", "--memory", "2G"]),
        ("create", ["web", "--cpu-count", "2"], ["web", "--cpus", "2"]),
        ("update", ["web", "-c", "2", "-m", "1GB"], ["web", "--cpus", "2", "--memory", "1G"]),
        ("kill", ["web", "-f"], ["web", "--force"]),
    ],
)
def test_each_kerf_flag_parses_as_ours(verb: str, kerf: list[str], ours: list[str]) -> None:
    assert parsed(verb, *kerf) == parsed(verb, *ours)


def test_the_docs_table_lists_every_kerf_verb_alias() -> None:
    text = DOCS.read_text()
    table = text[text.index("### mkctl and kerf") :]
    for kerf, ours in KERF_VERBS.items():
        assert re.search(rf"`mkctl {kerf} .*` \| `mkctl {ours} ", table), kerf


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_an_instance_is_found_by_its_id_as_kerf_names_it(host: Path) -> None:
    assert (await mkctl(host, "create", "web", "-c", "1", "-m", "128M"))[0] == 0
    code, out, _ = await mkctl(host, "dump", "web", "-o", "json")
    assert code == 0
    web = json.loads(out)[0]
    assert web["name"] == "web"
    number = str(web["id"])
    assert (await mkctl(host, "load", "web", "--image", str(host / "image")))[0] == 0
    code, out, _ = await mkctl(host, "start", "--id", number, "-o", "json")
    assert (code, json.loads(out)["state"]) == (0, "active")
    code, out, _ = await mkctl(host, "show", "--id", number, "-o", "json")
    assert [i["name"] for i in json.loads(out)] == ["web"]
    code, out, _ = await mkctl(host, "kill", "--id", number, "-f", "-o", "json")
    assert (code, json.loads(out)["state"]) == (0, "loaded")
    assert await fails(host, "delete", "--id", "99") == (
        3,
        "error: no instance has id 99 (mkctl show lists them)",
    )
    assert await fails(host, "delete") == (
        2,
        "error: mkctl delete: missing the instance: NAME (or --id N)",
    )
    assert (await mkctl(host, "delete", "--id", number))[0] == 0
