"""The operator console: a Starlette app that talks to the broker only.

Routes (every page but /login needs a signed-in operator; every POST a CSRF token):

    GET  /login, POST /login, POST /logout     sign in with the operator's broker token
    GET  /search, POST /search                  the form; a search redirects to its results
    GET  /results/{rid}                         the grid (coverage banner, export, similar)
    GET  /results/{rid}/hit/{rank}              one hit: the crop large, all metadata
    GET  /results/{rid}/sightings               a find-similar as a per-camera timeline
    POST /results/{rid}/export                  format=csv (as `fedretrieve query --csv`) | json
    POST /similar                               find similar from a hit (node, image)
    GET  /thumb?node=&image=&side=              a thumbnail through the broker's GetThumbnail
    GET  /fleet                                 the broker's Status: nodes, cameras, versions
    GET  /audit                                 the audit log (admins only)
    GET  /api/broker                            is the broker reachable (the page's banner)
    GET  /static/...                            CSS and JS from the package

Broker errors reach the page as the broker's own words (`BrokerClient` turns every gRPC
status into a FedRetrieveError with the reason); anything else is logged with its
traceback and shown as one line with a reference, never as a stack trace.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.errors import (
    ConfigError,
    FedRetrieveError,
    InvalidQuery,
    NotAuthorized,
    NotFound,
    Unavailable,
)
from server.console.audit import AuditLog, AuditUnavailable
from server.console.broker_link import BrokerLink
from server.console.config import ConsoleConfig, Operator, read_operators, read_or_create_secret
from server.console.results import (
    RANGES,
    ResultStore,
    SearchForm,
    apply_min_score,
    coverage_view,
    export_csv,
    export_json,
    sightings,
)
from server.operator.output import coverage_line, format_time

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI: the same headers on every response (pages, images, exports, errors)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class Console:
    config: ConsoleConfig
    operators: dict[str, Operator]
    signer: object
    throttle: object
    audit: AuditLog
    broker: BrokerLink
    results: ResultStore
    templates: Environment


def build_console(config: ConsoleConfig) -> Console:
    from server.console.sessions import Signer, SignInThrottle

    operators = read_operators(config)
    signer = Signer(read_or_create_secret(config.session_secret_file), config.session_ttl_s)
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(format_time=format_time, ranges=RANGES, quote=quote)
    return Console(
        config=config,
        operators=operators,
        signer=signer,
        throttle=SignInThrottle(config.max_failed_sign_ins),
        audit=AuditLog(config.audit_log),
        broker=BrokerLink(config),
        results=ResultStore(),
        templates=env,
    )


def create_app(config: ConsoleConfig) -> Starlette:
    from server.console.sessions import PRE_COOKIE, PRE_TTL_S, SESSION_COOKIE

    console = build_console(config)
    secure = config.tls.enabled

    # ------------------------------------------------------------ helpers
    def remote(request: Request) -> str:
        return request.client.host if request.client else "-"

    def page(
        request: Request, name: str, status: int = 200, *, who: Operator | None = None, **ctx
    ) -> HTMLResponse:
        session = getattr(request.state, "session", None)
        state = console.broker.state()
        html = console.templates.get_template(name).render(
            request=request,
            operator=who,
            csrf=console.signer.csrf_for(session.sid) if session else "",
            broker_address=config.broker,
            broker_down=state.up is False,
            broker_message=state.message,
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=secure,
        )

    def signed_in(request: Request) -> Operator | None:
        session = console.signer.verify(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        operator = console.operators.get(session.operator)
        if operator is None or not hmac.compare_digest(operator.fingerprint, session.fingerprint):
            return None
        request.state.session = session
        return operator

    async def form(request: Request) -> dict[str, list[str]]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise InvalidQuery("the form is too large")
        try:
            return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
        except (UnicodeDecodeError, ValueError) as err:
            raise InvalidQuery("the form could not be read") from err

    def csrf_ok(request: Request, fields: dict[str, list[str]]) -> bool:
        session = getattr(request.state, "session", None)
        token = (fields.get("csrf") or [None])[-1]
        return console.signer.check_csrf(session.sid if session else None, token)

    def sign_in_redirect(request: Request) -> Response:
        target = request.url.path
        if request.method == "GET" and request.url.query:
            target += "?" + request.url.query
        return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)

    def error_page(request: Request, who: Operator | None, err: Exception) -> Response:
        status, message = explain(err)
        return page(request, "error.html", status, who=who, message=message)

    def guarded(handler, *, admin: bool = False, post: bool = False):
        """Sign-in (and CSRF on POST) before the handler; errors as pages, never tracebacks."""

        async def endpoint(request: Request) -> Response:
            who = signed_in(request)
            if who is None:
                if request.url.path.startswith(("/api/", "/thumb")):
                    return JSONResponse({"error": "sign in first"}, status_code=401)
                return sign_in_redirect(request)
            if admin and not who.admin:
                return page(
                    request,
                    "error.html",
                    403,
                    who=who,
                    message="The audit log is shown to admin operators only.",
                )
            try:
                if post:
                    fields = await form(request)
                    if not csrf_ok(request, fields):
                        return page(
                            request,
                            "error.html",
                            403,
                            who=who,
                            message="The form was stale or not sent from this console "
                            "(CSRF check failed). Reload the page and try again.",
                        )
                    return await handler(request, who, fields)
                return await handler(request, who)
            except Exception as err:  # every failure becomes a page (see explain)
                return error_page(request, who, err)

        return endpoint

    # ------------------------------------------------------------ sign-in
    async def login_page(request: Request) -> Response:
        if signed_in(request):
            return RedirectResponse("/search", status_code=303)
        return login_form(request)

    def login_form(request: Request, status: int = 200, message: str = "") -> Response:
        pre = console.signer.new_pre_session()
        nxt = request.query_params.get("next", "")
        html = console.templates.get_template("login.html").render(
            request=request,
            operator=None,
            csrf=console.signer.csrf_for("pre:" + pre),
            next=nxt if _local_path(nxt) else "",
            message=message,
            broker_down=False,
        )
        response = HTMLResponse(html, status_code=status)
        set_cookie(response, PRE_COOKIE, pre, PRE_TTL_S)
        return response

    async def login(request: Request) -> Response:
        address = remote(request)
        try:
            fields = await form(request)
        except InvalidQuery as err:
            return login_form(request, 400, str(err))
        pre = request.cookies.get(PRE_COOKIE)
        token = (fields.get("csrf") or [None])[-1]
        if not pre or not console.signer.check_csrf("pre:" + pre, token):
            return login_form(
                request,
                403,
                "The sign-in form was stale or your browser did not keep its cookie; "
                "try again (cookies must be allowed for this console).",
            )
        if console.throttle.blocked(address):
            return login_form(request, 429, "Too many failed sign-ins: wait a minute.")
        given = (fields.get("token") or [""])[-1].strip()
        operator = _match_token(console.operators, given)
        if operator is None:
            console.throttle.failed(address)
            try:
                console.audit.record("-", "sign_in_refused", remote=address)
            except AuditUnavailable as err:
                return login_form(request, 503, str(err))
            return login_form(
                request, 401, "That token is not an operator's token for this console."
            )
        try:
            console.audit.record(operator.name, "sign_in", remote=address)
        except AuditUnavailable as err:
            return login_form(request, 503, str(err))
        _, cookie = console.signer.issue(operator.name, operator.fingerprint)
        nxt = (fields.get("next") or [""])[-1]
        response = RedirectResponse(nxt if _local_path(nxt) else "/search", status_code=303)
        set_cookie(response, SESSION_COOKIE, cookie, config.session_ttl_s)
        response.delete_cookie(
            PRE_COOKIE, path="/", httponly=True, samesite="strict", secure=secure
        )
        return response

    async def logout(request: Request, who: Operator, fields) -> Response:
        console.signer.revoke(request.state.session)
        console.audit.record(who.name, "sign_out", remote=remote(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure
        )
        return response

    # ------------------------------------------------------------ search
    async def fleet_status(who: Operator):
        """The broker's Status for the pickers, or None (and the banner) when it is down."""
        try:
            return await run_in_threadpool(console.broker.status, who)
        except FedRetrieveError as err:
            log.info("status failed: %s", err)
            return None

    def search_page(request, who, status_response, search_form, *, status=200, error="", **ctx):
        return page(
            request,
            "search.html",
            status,
            who=who,
            fleet=status_response,
            form=search_form,
            error=error,
            **ctx,
        )

    async def search_get(request: Request, who: Operator) -> Response:
        status_response = await fleet_status(who)
        return search_page(request, who, status_response, SearchForm())

    async def search_post(request: Request, who: Operator, fields) -> Response:
        search_form = SearchForm.from_fields(fields)
        what = {
            "text": search_form.text,
            "k": search_form.k,
            "nodes": search_form.nodes,
            "cameras": search_form.cameras,
            "range": search_form.range,
            "since": search_form.since,
            "until": search_form.until,
            "min_score": search_form.min_score,
        }
        try:
            request_pb = search_form.request()
            min_score = search_form.min_score_value()
            response = await run_in_threadpool(console.broker.search, who, request_pb)
        except FedRetrieveError as err:
            return await refused(request, who, search_form, "search", what, err)
        shown, hidden = apply_min_score(response, min_score)
        console.audit.record(
            who.name,
            "search",
            remote=remote(request),
            query=what,
            query_id=response.query_id,
            hits=len(shown.hits),
            coverage=_coverage_summary(response),
        )
        result = console.results.add(
            operator=who.name,
            kind="search",
            title=search_form.text.strip(),
            form=search_form,
            response=shown,
            hidden=hidden,
        )
        return RedirectResponse(f"/results/{result.rid}", status_code=303)

    async def refused(request, who, search_form, action, what, err) -> Response:
        """A refused search or find-similar: audited as refused, the reason on the page."""
        if isinstance(err, AuditUnavailable):
            raise err
        console.audit.record(
            who.name, action, remote=remote(request), query=what, outcome="refused", error=str(err)
        )
        status_response = await fleet_status(who)
        code, message = explain(err)
        return search_page(request, who, status_response, search_form, status=code, error=message)

    async def similar_post(request: Request, who: Operator, fields) -> Response:
        def one(name: str) -> str:
            return (fields.get(name) or [""])[-1].strip()

        node_id, image = one("node"), one("image")
        view = "sightings" if one("view") == "sightings" else "grid"
        origin = console.results.get(one("from"), who.name) if one("from") else None
        search_form = SearchForm(k=origin.form.k if origin else "20")
        if one("k"):
            search_form.k = one("k")
        what = {"node_id": node_id, "image_id": image, "k": search_form.k}
        try:
            try:
                image_id = int(image)
            except ValueError as err:
                raise InvalidQuery(f"image id {image!r} is not a number") from err
            request_pb = search_form.similar_request(node_id, image_id)
            response = await run_in_threadpool(console.broker.search_similar, who, request_pb)
        except FedRetrieveError as err:
            return await refused(request, who, search_form, "find_similar", what, err)
        console.audit.record(
            who.name,
            "find_similar",
            remote=remote(request),
            query=what,
            query_id=response.query_id,
            hits=len(response.hits),
            view=view,
            coverage=_coverage_summary(response),
        )
        result = console.results.add(
            operator=who.name,
            kind="similar",
            title=f"similar to {node_id}/{image_id}",
            form=search_form,
            response=response,
            hidden=0,
            source=(node_id, image_id),
        )
        suffix = "/sightings" if view == "sightings" else ""
        return RedirectResponse(f"/results/{result.rid}{suffix}", status_code=303)

    def held(rid: str, who: Operator):
        result = console.results.get(rid, who.name)
        if result is None:
            raise NotFound(
                "these results are no longer held (they expire after an hour, and when the "
                "console restarts): search again"
            )
        return result

    async def results_get(request: Request, who: Operator) -> Response:
        result = held(request.path_params["rid"], who)
        status_response = await fleet_status(who)
        return search_page(
            request,
            who,
            status_response,
            result.form if result.kind == "search" else SearchForm(),
            result=result,
            coverage=coverage_view(result.response),
            coverage_text=coverage_line(result.response),
        )

    async def detail_get(request: Request, who: Operator) -> Response:
        result = held(request.path_params["rid"], who)
        rank = _int_param(request.path_params["rank"], "rank")
        if not 1 <= rank <= len(result.response.hits):
            raise NotFound(f"hit {rank} is not in these results ({len(result.response.hits)} hits)")
        return page(
            request,
            "detail.html",
            who=who,
            result=result,
            rank=rank,
            hit=result.response.hits[rank - 1],
        )

    async def sightings_get(request: Request, who: Operator) -> Response:
        result = held(request.path_params["rid"], who)
        lanes, start, end, table = sightings(result.response)
        return page(
            request,
            "sightings.html",
            who=who,
            result=result,
            lanes=lanes,
            start=start,
            end=end,
            table=table,
            coverage=coverage_view(result.response),
            coverage_text=coverage_line(result.response),
        )

    async def export_post(request: Request, who: Operator, fields) -> Response:
        result = held(request.path_params["rid"], who)
        fmt = (fields.get("format") or ["csv"])[-1]
        if fmt not in ("csv", "json"):
            raise InvalidQuery(f"unknown export format {fmt!r}: csv or json")
        body = export_csv(result) if fmt == "csv" else export_json(result)
        console.audit.record(
            who.name,
            "export",
            remote=remote(request),
            format=fmt,
            query_id=result.response.query_id,
            title=result.title,
            hits=len(result.response.hits),
        )
        name = f"fedretrieve-{result.kind}-{result.response.query_id or result.rid}.{fmt}"
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
        return Response(
            body,
            media_type=media,
            headers={"content-disposition": f'attachment; filename="{_safe_name(name)}"'},
        )

    async def thumb_get(request: Request, who: Operator) -> Response:
        params = request.query_params
        node_id = params.get("node", "")
        try:
            image_id = _int_param(params.get("image", ""), "image")
            side = _int_param(params.get("side", "0") or "0", "side")
            thumb = await run_in_threadpool(console.broker.thumbnail, who, node_id, image_id, side)
        except FedRetrieveError as err:
            code, message = explain(err)
            return JSONResponse({"error": message}, status_code=code)
        console.audit.record(
            who.name,
            "thumbnail",
            remote=remote(request),
            node_id=node_id,
            image_id=image_id,
            side=side,
        )
        return Response(thumb.jpeg, media_type="image/jpeg")

    async def fleet_get(request: Request, who: Operator) -> Response:
        try:
            status_response = await run_in_threadpool(console.broker.status, who)
            error = ""
        except FedRetrieveError as err:
            status_response, error = None, explain(err)[1]
        return page(request, "fleet.html", who=who, fleet=status_response, error=error)

    async def audit_get(request: Request, who: Operator) -> Response:
        only = request.query_params.get("operator") or None
        entries = await run_in_threadpool(console.audit.tail, 500, only)
        return page(
            request,
            "audit.html",
            who=who,
            entries=entries,
            only=only or "",
            operators=sorted(console.operators),
            path=str(console.audit.path),
        )

    async def broker_api(request: Request, who: Operator) -> Response:
        state = console.broker.state()
        if state.up is not True or time.time() - state.checked > 5.0:
            await fleet_status(who)  # refreshes the state either way
            state = console.broker.state()
        return JSONResponse(
            {"up": bool(state.up), "message": state.message, "broker": config.broker}
        )

    async def root(request: Request) -> Response:
        return RedirectResponse("/search", status_code=303)

    async def not_found(request: Request, exc) -> Response:
        who = signed_in(request)
        return page(request, "error.html", 404, who=who, message="There is no such page.")

    async def server_error(request: Request, exc) -> Response:
        return error_page(request, signed_in(request), exc)

    routes = [
        Route("/", root),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", guarded(logout, post=True), methods=["POST"]),
        Route("/search", guarded(search_get), methods=["GET"]),
        Route("/search", guarded(search_post, post=True), methods=["POST"]),
        Route("/similar", guarded(similar_post, post=True), methods=["POST"]),
        Route("/results/{rid}", guarded(results_get), methods=["GET"]),
        Route("/results/{rid}/hit/{rank}", guarded(detail_get), methods=["GET"]),
        Route("/results/{rid}/sightings", guarded(sightings_get), methods=["GET"]),
        Route("/results/{rid}/export", guarded(export_post, post=True), methods=["POST"]),
        Route("/thumb", guarded(thumb_get), methods=["GET"]),
        Route("/fleet", guarded(fleet_get), methods=["GET"]),
        Route("/audit", guarded(audit_get, admin=True), methods=["GET"]),
        Route("/api/broker", guarded(broker_api), methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_found, Exception: server_error},
    )
    app.state.console = console
    return SecurityHeaders(app)


def explain(err: Exception) -> tuple[int, str]:
    """HTTP status and the one line the operator reads (no traceback, ever)."""
    if isinstance(err, InvalidQuery):
        return 400, str(err)
    if isinstance(err, NotAuthorized):
        return 403, str(err)
    if isinstance(err, NotFound):
        return 404, str(err)
    if isinstance(err, (Unavailable, AuditUnavailable)):
        return 503, str(err)
    if isinstance(err, (FedRetrieveError, ConfigError)):
        return 502, str(err)
    ref = secrets.token_hex(4)
    log.error("console error %s", ref, exc_info=err)
    return 500, f"The console hit an unexpected error (reference {ref}; see its log)."


def _match_token(operators: dict[str, Operator], given: str) -> Operator | None:
    """The operator whose token this is; every token compared, in constant time."""
    found = None
    for operator in operators.values():
        if hmac.compare_digest(operator.token.encode(), given.encode()) and given:
            found = operator
    return found


def _local_path(target: str) -> bool:
    """Only same-site paths after sign-in (no open redirect to another host)."""
    return target.startswith("/") and not target.startswith("//") and "\\" not in target


def _int_param(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise InvalidQuery(f"{what} {text!r} is not a number") from err


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _coverage_summary(response) -> dict:
    cov = response.coverage
    return {
        "answered": cov.nodes_answered,
        "total": cov.nodes_total,
        "vectors_searched": cov.vectors_searched,
        "vectors_total": cov.vectors_total,
        "missing": [o.node_id for o in cov.nodes if o.state not in ("ok", "skipped")],
        "merge": response.merge,
        "broker_ms": round(response.took_ms, 1),
    }
