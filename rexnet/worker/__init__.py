"""twistd rexnet-worker (cexec's cservice): hears announcements, connects back after a
load-based delay, runs each job's process over its channel."""
