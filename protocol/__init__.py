"""The typed contract of the multikernel bus (no I/O).

Every frame on a ring is an envelope: a fixed binary header the hub routes on, followed by a
msgspec-encoded body. This package holds the envelope, the bus control messages and every
actor's request/response/event types, so clients, the CLI and actors share one contract without
importing each other.
"""
