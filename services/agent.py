"""`python -m multikernel.services.agent`: the instance agent (started by the lifecycle actor)."""

from multikernel.services._agent import main

if __name__ == "__main__":
    main()
