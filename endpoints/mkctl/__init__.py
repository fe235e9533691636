"""`mkctl`: drive a multikernel host, its instances and its bus from the command line.

A pure client of the bus: every verb is a request to an actor (`lifecycle`, an instance's agent)
or to the hub. `mkctl host up` starts the host process by module name and `mkctl image` runs the
image tool the same way; neither is imported. The verbs live one group to a module:

- `_host`: `host up | down | status`;
- `_instances`: the lifecycle verbs (`create, load, start, kill, update, show, delete`), `exec`;
- `_bus`: the inspector (`bus list | introspect | stats | monitor | call | pub`);
- `_image`, `_completion`: the image tool, shell completion scripts.

`_app` is the command itself and its error handling (`_errors`: one line, an exit status by
kind); `_output` renders what the read verbs return as `-o table|wide|json|yaml`.
"""

from multikernel.endpoints.mkctl._app import cli as cli
from multikernel.endpoints.mkctl._app import main as main
from multikernel.endpoints.mkctl._app import run as run
from multikernel.endpoints.mkctl._errors import EXIT_CODES as EXIT_CODES
from multikernel.endpoints.mkctl._errors import exit_code as exit_code
