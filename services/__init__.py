"""Bus actors (lifecycle, resource, fault), the platform layer, the instance agent, the host."""
