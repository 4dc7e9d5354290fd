"""The gRPC plumbing both services share (edge node's NodeService, the broker's BrokerService).

One implementation each of: the bearer-token interceptor and TLS server credentials
(`auth`), the error mapping around servicer methods (`errors`), and the server set-up
every daemon repeats: health, reflection, binding the listen address (`server`).
Like the rest of `common/`, nothing here imports edge_node, server, sims or protos; each
daemon passes in its own service names, tokens and hooks.
"""
