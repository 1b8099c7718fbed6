"""Talking to Triton: the control client (gRPC) and the embedded server's supervisor."""
