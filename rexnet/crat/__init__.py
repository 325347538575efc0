"""twistd crat: verifies, rate-limits and records signed alerts; the live dashboard."""
