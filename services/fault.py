"""`python -m multikernel.services.fault`: the fault actor, in its own process (the host runs it).

It attaches through the bus socket it inherited ($MULTIKERNEL_BUS_FD, bound by the hub to the
host's instance 0) and keeps its state in `<state-dir>/fault.db`. It exits when the host does:
$MULTIKERNEL_LIFELINE_FD is the read end of a pipe only the host writes to, at EOF the host is
gone. docs/fault.md.
"""

from multikernel.services._fault_main import main

if __name__ == "__main__":
    main()
