"""What every rexnet process uses to talk: announcement checks and the UDP endpoints,
signed alerts, the framed channel with flow control, the TLS datagram link, pipe
readers, addresses, and options every twistd service shares."""
