"""Protocol edges: each parses its requests and shapes its answers; `gateway.dataplane` does the rest."""
