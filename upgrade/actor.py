"""`python -m multikernel.upgrade.actor`: the upgrade actor, in its own process (the host runs it).

It attaches through the bus socket it inherited ($MULTIKERNEL_BUS_FD, bound by the hub to the
host's instance 0), keeps its state in `<state-dir>/upgrade.db` and the images and preserved
states it keeps under `<state-dir>/upgrade/`, and exits when the host does ($MULTIKERNEL_LIFELINE_FD
reaches EOF). docs/upgrade.md.
"""

from multikernel.upgrade._main import main

if __name__ == "__main__":
    main()
