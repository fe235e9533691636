"""`python -m multikernel.endpoints.mkctl`: the same as the `mkctl` script."""

from multikernel.endpoints.mkctl._app import run

if __name__ == "__main__":
    run()
