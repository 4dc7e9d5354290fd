"""common.rpc on a real gRPC server on loopback: token checks for a node-style and a
broker-style set-up, refusal before deserialization, open health (and reflection where
chosen), and the one error mapping (domain error, proxied RpcError, unexpected bug)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.errors import ConfigError, InvalidQuery
from common.rpc.auth import REFLECTION_PREFIX, BearerTokenAuth, server_credentials
from common.rpc.errors import translate_errors
from common.rpc.server import add_health_and_reflection, bind

SERVICE = "test.Echo"
NODE_TOKEN = "node-secret"
OPERATOR_TOKENS = ("op-one", "op-two")
UNDECODABLE = b"\xff\xff\xff"  # not a valid protobuf message
request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="-")


class ProxiedCallFailed(grpc.RpcError):
    """What an outgoing call raises (the broker's GetThumbnail proxy)."""


@dataclass
class Recorder:
    deserialized: list[bytes] = field(default_factory=list)
    outcomes: list[tuple[str, grpc.StatusCode]] = field(default_factory=list)
    seen_in_scope: list[str] = field(default_factory=list)

    def deserializer(self, data: bytes) -> health_pb2.HealthCheckRequest:
        self.deserialized.append(data)
        return health_pb2.HealthCheckRequest.FromString(data)


@contextlib.contextmanager
def request_scope(request) -> Iterator[None]:
    token = request_var.set(getattr(request, "service", "") or "-")
    try:
        yield
    finally:
        request_var.reset(token)


def record_outcome(servicer, method: str, code: grpc.StatusCode, _seconds: float) -> None:
    servicer.recorder.outcomes.append((method, code))


def map_proxied(err: grpc.RpcError, request) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.FAILED_PRECONDITION, f"node x: {err}"


translated = translate_errors(
    "test", on_outcome=record_outcome, map_rpc_error=map_proxied, scope=request_scope
)


class EchoServicer:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @translated
    def Say(self, request, context):
        self.recorder.seen_in_scope.append(request_var.get())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    @translated
    def Refuse(self, request, context):
        raise InvalidQuery("`text` is empty: send a description")

    @translated
    def Proxy(self, request, context):
        raise ProxiedCallFailed("refused the broker")

    @translated
    def Boom(self, request, context):
        raise RuntimeError("secret internals in a traceback")

    def Chat(self, request_iterator, context):
        for _request in request_iterator:
            yield health_pb2.HealthCheckResponse()


@dataclass
class Served:
    channel: grpc.Channel
    recorder: Recorder

    def call(self, method: str, payload: bytes = b"", metadata=None) -> bytes:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")(
            payload, metadata=metadata, timeout=10
        )


@pytest.fixture
def serve() -> Iterator:
    started: list[tuple[grpc.Server, grpc.Channel]] = []

    def start(interceptors: list[grpc.ServerInterceptor]) -> Served:
        recorder = Recorder()
        servicer = EchoServicer(recorder)
        unary = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name),
                request_deserializer=recorder.deserializer,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
            for name in ("Say", "Refuse", "Proxy", "Boom")
        }
        chat = grpc.stream_stream_rpc_method_handler(
            servicer.Chat,
            request_deserializer=recorder.deserializer,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {**unary, "Chat": chat}),)
        )
        add_health_and_reflection(server, (SERVICE,))
        port = bind(server, "127.0.0.1:0", server_credentials(None, None))
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return Served(channel, recorder)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(None)


def node_style() -> list[grpc.ServerInterceptor]:
    return [BearerTokenAuth((NODE_TOKEN,))]


def broker_style() -> list[grpc.ServerInterceptor]:
    return [
        BearerTokenAuth(OPERATOR_TOKENS, open_prefixes=(REFLECTION_PREFIX,), token_name="operator")
    ]


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def list_services(channel: grpc.Channel, metadata=None) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=metadata,
        timeout=10,
    )
    return {s.name for reply in replies for s in reply.list_services_response.service}


def health_check(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


@pytest.mark.parametrize(
    ("setup", "good", "name"),
    [(node_style, NODE_TOKEN, "bearer"), (broker_style, OPERATOR_TOKENS[1], "operator")],
)
def test_missing_or_wrong_token_is_refused_and_health_stays_open(serve, setup, good, name, caplog):
    served = serve(setup())
    caplog.set_level(logging.WARNING, logger="common.rpc.auth")
    refused = (
        (None, "missing"),
        (bearer("nope"), "wrong"),
        ([("authorization", good)], "wrong"),  # no "Bearer " scheme
        (bearer(good + "x"), "wrong"),
    )
    for metadata, reason in refused:
        with pytest.raises(grpc.RpcError) as err:
            served.call("Say", b"", metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details().startswith(f"{reason} {name} token")
    assert served.recorder.outcomes == [] and served.recorder.deserialized == []
    assert len(caplog.records) == len(refused)  # one short warning per refusal
    assert all(f"/{SERVICE}/Say" in r.getMessage() for r in caplog.records)
    assert good not in caplog.text and "nope" not in caplog.text

    assert served.call("Say", b"", bearer(good)) == b"\x08\x01"  # SERVING
    assert served.recorder.outcomes == [("Say", grpc.StatusCode.OK)]
    for service in ("", SERVICE):  # no token needed
        assert health_check(served.channel, service) == health_pb2.HealthCheckResponse.SERVING


def test_every_broker_token_is_accepted(serve):
    served = serve(broker_style())
    for token in OPERATOR_TOKENS:
        served.call("Say", b"", bearer(token))
    assert len(served.recorder.outcomes) == 2


@pytest.mark.parametrize("setup", [node_style, broker_style])
def test_undecodable_bytes_from_an_anonymous_caller_are_never_deserialized(serve, setup):
    served = serve(setup())
    with pytest.raises(grpc.RpcError) as err:
        served.call("Say", UNDECODABLE)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # not INTERNAL
    chat = served.channel.stream_stream(f"/{SERVICE}/Chat")
    with pytest.raises(grpc.RpcError) as err:
        list(chat(iter([UNDECODABLE, UNDECODABLE]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served.recorder.deserialized == []


def test_unknown_methods_are_refused_to_anonymous_callers(serve):
    served = serve(node_style())
    with pytest.raises(grpc.RpcError) as err:
        served.call("NoSuchMethod")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        served.call("NoSuchMethod", b"", bearer(NODE_TOKEN))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_is_open_on_the_broker_and_needs_the_token_on_a_node(serve):
    broker = serve(broker_style())
    assert {SERVICE, "grpc.health.v1.Health"} <= list_services(broker.channel)
    node = serve(node_style())
    with pytest.raises(grpc.RpcError) as err:
        list_services(node.channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert SERVICE in list_services(node.channel, bearer(NODE_TOKEN))


def test_errors_map_to_statuses_and_a_bug_leaves_as_internal_without_traceback(serve, caplog):
    served = serve([])  # no auth: the error mapping alone
    caplog.set_level(logging.INFO, logger="common.rpc.errors")
    expected = {
        "Refuse": (grpc.StatusCode.INVALID_ARGUMENT, "`text` is empty: send a description"),
        "Proxy": (grpc.StatusCode.FAILED_PRECONDITION, "node x: refused the broker"),
    }
    for method, (code, details) in expected.items():
        with pytest.raises(grpc.RpcError) as err:
            served.call(method)
        assert (err.value.code(), err.value.details()) == (code, details)

    with pytest.raises(grpc.RpcError) as err:
        served.call("Boom")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details()
    assert details == "internal test error in Boom; see the test's log for details"
    assert "Traceback" not in details and "secret internals" not in details
    (logged,) = [r for r in caplog.records if r.exc_info]  # logged once, with its traceback
    assert "Boom" in logged.getMessage() and "secret internals" in caplog.text

    assert served.recorder.outcomes == [
        ("Refuse", grpc.StatusCode.INVALID_ARGUMENT),
        ("Proxy", grpc.StatusCode.FAILED_PRECONDITION),
        ("Boom", grpc.StatusCode.INTERNAL),
    ]


def test_scope_wraps_the_call(serve):
    served = serve([])
    served.call("Say", health_pb2.HealthCheckRequest(service="q-42").SerializeToString())
    assert served.recorder.seen_in_scope == ["q-42"] and request_var.get() == "-"


def test_an_rpc_error_without_a_mapping_is_a_bug():
    plain = translate_errors("node")

    class Context:
        def abort(self, code, details):
            raise RuntimeError((code, details))

    @plain
    def Proxy(self, request, context):
        raise ProxiedCallFailed("x")

    with pytest.raises(RuntimeError) as err:
        Proxy(None, None, Context())
    assert err.value.args[0][0] == grpc.StatusCode.INTERNAL


def test_interceptor_and_credentials_refuse_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        BearerTokenAuth("one-token")  # type: ignore[arg-type]
    for tokens in ((), ("ok", "")):
        with pytest.raises(ValueError):
            BearerTokenAuth(tokens)
    assert server_credentials("", "", "") is None and server_credentials(None, None) is None
    with pytest.raises(ConfigError, match="together"):
        server_credentials(tmp_path / "cert.pem", None)
    with pytest.raises(ConfigError, match="cannot read"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_bind_failure_is_a_config_error():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(ConfigError, match="listen: cannot bind"):
            bind(server, "256.0.0.1:0")
    finally:
        server.stop(None)


STOP_SCRIPT = """
import signal, sys, threading, time
from common.rpc.server import wait_for_stop_signal

def worker():  # like a gRPC or faiss thread, which the kernel may pick for the signal
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    time.sleep(30)

threading.Thread(target=worker, daemon=True).start()
print(wait_for_stop_signal(), flush=True)
"""


def test_a_daemon_hears_sigterm_delivered_to_another_thread() -> None:
    """A main thread blocked in a plain Event.wait() never ran the handler of a SIGTERM
    that landed on a worker thread (a node daemon was SIGKILLed that way)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", STOP_SCRIPT], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SIGTERM"
