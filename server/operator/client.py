"""The operator's side of BrokerService: one channel, a token, and errors an operator can read.

Every gRPC failure is turned into a FedRetrieveError subclass whose message says what went
wrong and what to do, so the CLI never shows a traceback.
"""

from __future__ import annotations

import grpc

from common.errors import (
    ConfigError,
    FedRetrieveError,
    InvalidQuery,
    NotAuthorized,
    NotFound,
    Unavailable,
)
from common.rpc.client import open_channel
from protos import broker_pb2, broker_pb2_grpc, retrieval_pb2
from server.operator.output import safe

ANSWER_SLACK_S = 2.0  # on top of the query deadline: transport and merge


class BrokerClient:
    """A connection to one broker; use as a context manager."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: tuple[str | None, str | None, str | None] = (None, None, None),
        connect_timeout: float = 5.0,
    ) -> None:
        if ":" not in address:
            raise ConfigError(f"--broker must be host:port, got {address!r}")
        self.address = address
        self.token = token
        self.connect_timeout = connect_timeout
        ca, cert, key = tls
        self.channel = open_channel(address, ca=ca, cert=cert, key=key)
        self.stub = broker_pb2_grpc.BrokerServiceStub(self.channel)
        self._ready = False

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _connect(self) -> None:
        if self._ready:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError as err:
            raise Unavailable(
                f"cannot reach the broker at {self.address} within {self.connect_timeout:g} s "
                "(is `fedretrieve broker serve` running there, and is the port right?)"
            ) from err
        self._ready = True

    def search(self, request: broker_pb2.BrokerSearchRequest) -> broker_pb2.BrokerSearchResponse:
        return self._query(self.stub.Search, request, "search")

    def search_similar(
        self, request: broker_pb2.SearchSimilarRequest
    ) -> broker_pb2.BrokerSearchResponse:
        """Find similar: the fleet searched with one node's crop (embedded on that node)."""
        return self._query(self.stub.SearchSimilar, request, "find-similar")

    def _query(self, method, request, what: str) -> broker_pb2.BrokerSearchResponse:
        self._connect()
        budget = (request.deadline_ms / 1000.0) if request.deadline_ms else 30.0
        try:
            return method(request, timeout=budget + ANSWER_SLACK_S, metadata=self._metadata())
        except grpc.RpcError as err:
            raise self._explain(err, what) from None

    def thumbnail(
        self, node_id: str, image_id: int, max_side: int = 160
    ) -> retrieval_pb2.ThumbnailResponse:
        self._connect()
        request = broker_pb2.BrokerThumbnailRequest(
            node_id=node_id, image_id=image_id, max_side=max_side
        )
        try:
            return self.stub.GetThumbnail(request, timeout=10.0, metadata=self._metadata())
        except grpc.RpcError as err:
            raise self._explain(err, f"thumbnail {node_id}/{image_id}") from None

    def status(self) -> broker_pb2.BrokerStatusResponse:
        self._connect()
        try:
            return self.stub.Status(
                broker_pb2.BrokerStatusRequest(), timeout=10.0, metadata=self._metadata()
            )
        except grpc.RpcError as err:
            raise self._explain(err, "status") from None

    def _explain(self, err: grpc.RpcError, what: str) -> FedRetrieveError:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (err.details() if isinstance(err, grpc.Call) else str(err)) or code.name
        details = safe(details)  # may quote a node's words: never raw to the terminal
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = (
                "give one with --token-file or FEDRETRIEVE_TOKEN"
                if not self.token
                else "check the token"
            )
            return NotAuthorized(
                f"the broker at {self.address} refused the operator token ({hint}): {details}"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidQuery(f"the broker rejected the {what}: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"{what}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(f"no answer from the broker at {self.address} in time ({what})")
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"{what} failed at {self.address}: {details}")
        return FedRetrieveError(f"{what} failed at {self.address} with {code.name}: {details}")
