"""twistd cproxy and twistd rexnet-tunnel: carry announcements and connect-backs between
networks; TLS stays end to end."""
