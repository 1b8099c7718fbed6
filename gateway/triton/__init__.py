"""All Triton I/O: the control client, the HTTP and gRPC data clients, and the embedded server's supervisor."""
