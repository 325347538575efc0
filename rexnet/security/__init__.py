"""Who may talk to whom: credentials and keygen, revocation lists, mutual TLS options and
the peer check, process hardening."""
