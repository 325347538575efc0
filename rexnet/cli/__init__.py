"""The rexnet and cexec commands: the stdlib-only launcher, the full command line,
rexnet.toml's use by it, man pages, completion and the demo. The top layer."""
