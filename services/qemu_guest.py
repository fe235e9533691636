"""`python -m multikernel.services.qemu_guest`: the program a `qemu` guest's /init runs."""

from multikernel.services._qemu_guest import main

if __name__ == "__main__":
    main()
