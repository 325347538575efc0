"""What rexnet says on the wire and to its agent, as bytes: datagrams, channel frames,
agent messages, exit codes. Sans-IO: no reactor, no sockets; the bottom layer."""
