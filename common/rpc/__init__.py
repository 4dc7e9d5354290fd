"""The gRPC plumbing both services share (edge node's NodeService, the broker's BrokerService).

One implementation each of: the server interceptor (bearer tokens, refused-auth hook) and
TLS server credentials (`auth`), undecodable request bytes as INVALID_ARGUMENT
(`decoding`, applied by that interceptor), the error mapping around servicer methods
(`errors`), the query-id rule both sides log by (`query_id`), and the server set-up every
daemon repeats: health, reflection, binding the listen address (`server`).
Like the rest of `common/`, nothing here imports edge_node, server, sims or protos; each
daemon passes in its own service names, tokens and hooks.
"""
