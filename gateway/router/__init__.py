"""The model-aware router: one stateless process in front of N gateway instances.

Clients talk to it as they would to one gateway (KServe v2 HTTP and gRPC, SageMaker runtime); it sends each
request, bytes unchanged, to an instance that has the TargetModel loaded (affinity), or for a cold model to
the instance rendezvous hashing names, weighted by free model memory, so that every router agrees without
talking to the others. Modules, one job each: `settings` (flags), `discovery` (static list or DNS),
`fleet` (instance state), `policy` (the pure routing decision), `table` (leases on instances, learning),
`health` (probes and model listings), `http` and `grpc` (forwarding), `metrics`, `server` (composition).
"""
