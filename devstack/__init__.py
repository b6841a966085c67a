"""Local development launcher: runs the whole stack on loopback (make run) and supervises it; not a service."""
