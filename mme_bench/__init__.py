"""`mme-gateway bench`: benchmark gateways and report latency, cache behaviour and cost.

Modules, one job each: `config` (the validated config file), `workload` (Zipf popularity, arrivals,
payloads), `models` (the model set, synthetic artifacts), `launcher` (gateway subprocesses), `client`
(one invocation, routes, error classes), `scrape` (the gateway's /metrics), `loadgen` (sequential,
closed- and open-loop drivers), `perf` (perf_analyzer passes), `runner` (sessions), `stats`, `cost`,
`analysis` (tables), `charts`, `results` (the directory) and `report` (the HTML page).
"""
