"""The trio drivers: UDP sockets, the C socket pump, :class:`Channel` and the trio face of spaces."""
