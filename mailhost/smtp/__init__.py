"""mailhost's own SMTP protocol: the shared codec and the server."""
