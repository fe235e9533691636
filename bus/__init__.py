"""The hub: sessions, router, names, access control and monitor."""
