"""Endpoints: channels over shared memory carrying the protocol, the application client, mkctl."""
