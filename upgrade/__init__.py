"""Zero-downtime upgrade: the preserved-state (KHO-like) format and the upgrade actor."""
