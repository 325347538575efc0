"""The per-user agent rexnet exec hands its descriptors to: it keeps credentials and warm
channels between jobs."""
