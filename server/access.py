"""
Who may call the server, and how much one request may send. A server on 127.0.0.1 is
reachable by every web page its user visits: a page can make the browser POST to it
(a form-like body needs no CORS preflight), and a DNS-rebinding page, whose own name
now points at 127.0.0.1, can even read the answers. So, before any route runs:

    Host     must name this server's address (or a name given with --allow_host):
             a rebinding page's requests carry its own name, and get 403
    Origin   if present, must be this server's own origin (its page) or one given
             with --allow_origin: other pages get 403
    API key  with --api_key (or SMOL_API_KEY), every call of the API (/v1/, /tokenize,
             /detokenize, /tokenizer_info) needs "Authorization: Bearer KEY", as OpenAI
             clients send it: 401 otherwise
    body     at most max_body bytes, counted as it arrives: 413 past it

Errors come back in OpenAI's error shape, as every other error of the server.
"""
import hmac
import ipaddress
import json

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
API_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # what --api_key guards


def error_body(message, code=None, type="invalid_request_error", param=None):
    """An error as OpenAI's API sends it, the shape every 4xx and 5xx of the server has."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def host_names(bound, extra=()):
    """The names a Host header may carry for a server bound to `bound`; None: any
    (bound to every interface, its names cannot be known; --api_key is the guard)."""
    try:
        ip = ipaddress.ip_address(bound)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        return None
    names = {bound.lower(), *(h.lower() for h in extra)}
    if bound.lower() == "localhost" or (ip is not None and ip.is_loopback):
        names |= LOOPBACK_NAMES
    return names


def host_of(header):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Name' -> 'name'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Access:
    """ASGI middleware applying the rules above to every HTTP request."""

    def __init__(self, app, hosts=None, origins=(), api_key=None, max_body=1 << 20):
        self.app, self.hosts, self.origins = app, hosts, set(origins)
        self.api_key, self.max_body = api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        if self.hosts is not None and host_of(host) not in self.hosts:
            return await reply(send, 403, f"Host '{host}' is not an address of this server (a page on another "
                                          f"site, via DNS rebinding?); python -m server --allow_host NAME "
                                          f"accepts a name",
                               "forbidden_host")
        cross = origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower()
        allowed = "*" in self.origins or origin in self.origins
        if cross and not allowed:
            return await reply(send, 403, f"Origin '{origin}' may not call this server (only its own page may); "
                                          f"python -m server --allow_origin ORIGIN lets a site in", "forbidden_origin")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] \
            if cross and allowed else []
        if cors and scope["method"] == "OPTIONS":  # a preflight from an allowed site
            return await reply(send, 204, None, extra=cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")])
        if self.api_key is not None and scope["path"].startswith(API_PATHS):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {self.api_key}".encode("latin-1")):
                return await reply(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' "
                                              "with the key the server was started with", "invalid_api_key",
                                   extra=cors)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length", "0")
            if declared.isdigit() and int(declared) > self.max_body:
                return await reply(send, 413, self.too_big(), "request_too_large", extra=cors)
            body, more = b"", True
            while more:  # counted as it arrives: a chunked body declares no length
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await reply(send, 413, self.too_big(), "request_too_large", extra=cors)
            receive = replay(body, receive)
        if cors:
            send = with_headers(send, cors)
        await self.app(scope, receive, send)

    def too_big(self):
        return f"The request body is larger than this server's limit of {self.max_body:,} bytes"


def replay(body, receive):
    """A receive that gives the body already read, then waits on the client as before."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_again


def with_headers(send, extra):
    async def send_with(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)
    return send_with


async def reply(send, status, message, code=None, extra=()):
    body = b"" if message is None else json.dumps(error_body(message, code)).encode()
    headers = [(b"content-length", str(len(body)).encode())] + list(extra)
    if body:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
