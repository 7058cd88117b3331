"""
Serve one model over HTTP: a chat page for people, an OpenAI-compatible API for programs.

    python serve.py --init_from path/to/SmolLM2-135M-Instruct   # then open http://127.0.0.1:8000
    python serve.py --out_dir out                                # a model trained here (out/ckpt.pt)

    GET  /                       the page: chat (instruct models) or completion (base models)
    POST /v1/chat/completions    messages -> reply, as OpenAI's API (stream: true for SSE)
    POST /v1/completions         prompt -> continuation
    GET  /v1/models
    GET  /health                 {"status": "ok", "model", "chat", "context_length", "active_requests":
                                 generating or waiting, "decoding": rows in the batch, "waiting",
                                 "decode_steps" and "last_batch": batched steps so far and the rows
                                 of the last one, "tokens_generated": every token generated since
                                 the server started, for all requests together}

How requests share the model: continuous batching (engine.Batcher). Every request
being generated is one row of one batch, advanced by one batched decode step per
token; a new request joins after its prompt is read, a finished or abandoned one
leaves at once. --max_batch rows at most, --max_waiting requests in line behind them
(past that: 429), and one KV-cache budget for all rows together (--cache_mb). Who may
call, and how big a body may be, is access.py's job. docs/chat-and-serve.md has the
memory model and measured throughput.
Needs fastapi and uvicorn: pip install -r requirements-serve.txt
"""
import asyncio
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Annotated, Literal

from access import Access, error_body, host_names
from chat import ROLES, StopStrings, TextStream, chat_stop_ids, is_chat_model, render_chat
from common import HERE, Parser, UserError, add_model_flags, fail, pick_dtype, use_compile

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as e:
    fail(f"serve.py needs {e.name}: pip install -r requirements-serve.txt")

import torch

from data import load_tokenizer
from engine import Batcher, Busy, ModelOverflow, Sequence, load_from_flags
from smol import EOT_ID, SmolLM

# what one request may ask for: every bound answers a client's mistake with a 400, not a 500
MAX_BODY = 1 << 20  # bytes of JSON (413 past it): a whole context of text fits many times over
MAX_MESSAGES = 1024
MAX_STOPS, MAX_STOP_CHARS = 4, 1024  # OpenAI's API allows 4 stop strings


# ---- requests, as OpenAI's API defines them (the fields this server honours) ----
# strict: "5" is not 5 and 0 is not false; a client sending those has a bug worth hearing about

class Request_(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, lt=1 << 31)
    max_completion_tokens: int | None = Field(None, ge=1, lt=1 << 31)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1 << 20)  # not in OpenAI's API (0 = off); llama.cpp's server and the page use it
    ignore_eos: bool = False  # not in OpenAI's API either (vLLM's): run to max_tokens, for benchmarks
    stop: str | list[str] | None = None  # one string or up to MAX_STOPS (checked by stop_strings)
    seed: int | None = Field(None, ge=0, lt=1 << 64)  # what torch's generator takes
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal[ROLES]
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Request_):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(Request_):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt: no batches


UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """A request this server cannot serve: sent back as OpenAI sends its errors."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, code, type, param)
        self.headers = headers


def stop_strings(req):
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


# ---- the model, behind the batcher ----

class ServedModel:
    """The model, its tokenizer and its name, behind one Batcher."""

    def __init__(self, model, tokenizer, name, device, max_batch, cache_bytes, max_waiting, compile=False,
                 thread=True):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.batcher = Batcher(model, max_batch=max_batch, cache_bytes=cache_bytes, max_waiting=max_waiting,
                               compile=compile, thread=thread)
        self.context = model.config.max_position_embeddings
        self.chat = is_chat_model(model)
        # no prompt longer than this many characters can fit: checked before tokenizing
        self.max_chars = self.context * max(len(t) for t in tokenizer.get_vocab())

    def check(self, req):
        if req.model is not None and req.model != self.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server has '{self.name}' "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    async def encode(self, text, param):
        if len(text) > self.max_chars:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the {param} has "
                                f"{len(text):,} characters, more than that many tokens can hold",
                           param=param, code="context_length_exceeded")
        # off the event loop: a long prompt must not hold up the other clients
        return (await asyncio.to_thread(self.tokenizer.encode, text)).ids

    def budget(self, req, n_prompt):
        """max_tokens, or all the room the context (a compiled batch: its row) has left when none is asked for."""
        limit = self.batcher.fixed[1] if self.batcher.fixed else self.context
        room = limit - n_prompt
        what = f"This model's maximum context length is {self.context} tokens" if limit == self.context else \
            f"This server holds at most {limit} tokens per request (a compiled batch of fixed rows)"
        if room < 1:
            raise APIError(400, f"{what}; the prompt has {n_prompt}", code="context_length_exceeded",
                           param="messages" if hasattr(req, "messages") else "prompt")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > room:
            raise APIError(400, f"{what}; the prompt has {n_prompt} and max_tokens asks for {wanted} more "
                                f"(at most {room})", param="max_tokens", code="context_length_exceeded")
        return wanted or room

    def submit(self, prompt_ids, req, stop_ids):
        """Queue the request in the batcher; its tokens arrive on the returned asyncio
        queue (then None, or an Exception if the model failed)."""
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        seq = Sequence(prompt_ids, self.budget(req, len(prompt_ids)),
                       lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token),
                       temperature=req.temperature, top_k=req.top_k or None, top_p=req.top_p, seed=req.seed,
                       stop_ids=stop_ids)
        try:
            self.batcher.submit(seq)
        except Busy as e:
            raise APIError(429, f"The server is busy ({e}); try again shortly", code="server_busy",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, f"This request does not fit in this server's memory: {e}; ask for fewer "
                                f"max_tokens", param="max_tokens", code="context_length_exceeded") from None
        return seq, tokens

    async def generate(self, seq, tokens, req, stop_ids, request):
        """Yield (text, None) pieces as they are decoded, then (text, finish_reason) with
        finish_reason "stop" (a stop id or stop string) or "length". While the request waits
        for a row: (None, n), n the requests ahead of it in line, at once and every second."""
        text, stops, finish = TextStream(self.tokenizer), StopStrings(stop_strings(req)), "length"
        n = 0
        try:
            if (ahead := self.batcher.ahead(seq, for_a_row=True)) is not None:
                yield None, ahead  # every row is taken: say so before the client's read times out
            while True:
                if tokens.empty():  # a client that went away is noticed even while its request waits in line
                    try:
                        token = await asyncio.wait_for(tokens.get(), timeout=1.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        if (ahead := self.batcher.ahead(seq)) is not None:
                            yield None, ahead
                        continue
                else:
                    token = tokens.get_nowait()
                if token is None:
                    break
                if isinstance(token, Exception):
                    raise token
                n += 1
                request.state.completion_tokens = n
                if token in stop_ids:
                    finish = "stop"
                    break
                piece, stopped = stops.push(text.push(token))
                if stopped:
                    finish = "stop"
                    yield piece, finish
                    return
                if piece:
                    yield piece, None
                if n % 16 == 0 and await request.is_disconnected():
                    return
            yield stops.held, finish  # the text held back in case a stop string began there
        finally:
            seq.cancelled = True  # done, stopped or abandoned: its row is free at the next step


def create_app(served):
    app = FastAPI(title="smol", docs_url=None, redoc_url=None, openapi_url=None)
    with open(os.path.join(HERE, "serve.html"), encoding="utf-8") as f:
        page = f.read()

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e):
        err = e.errors()[0]
        # the field's path, e.g. messages.0.content, less "body" and the union member that
        # pydantic tried ("str", "list[TextPart]"), which is no field of the request
        loc = [str(x) for x in err["loc"]
               if x != "body" and not (isinstance(x, str) and (x in UNION_MEMBERS or "[" in x))]
        if err["type"] == "json_invalid":
            reason = err.get("ctx", {}).get("error", "parse error")
            message, param = f"The request body is not valid JSON ({reason})", None
        elif err["type"] == "missing" and not loc:
            message, param = "The request needs a JSON body", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {err['msg']}" if param else err["msg"]
        return JSONResponse(APIError(400, message, param=param).body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug of ours: the detail goes to the server's log, not the client
        print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
        if isinstance(e, ModelOverflow):  # not a bug: the server runs the model in too small a dtype
            return JSONResponse(APIError(500, str(e), type="server_error").body, status_code=500)
        traceback.print_exception(e)
        return JSONResponse(APIError(500, "internal error", type="server_error").body, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        b = served.batcher
        return {"status": "ok", "model": served.name, "chat": served.chat, "context_length": served.context,
                "active_requests": b.active, "decoding": len(b.rows), "waiting": len(b.waiting),
                "decode_steps": b.steps, "last_batch": b.last_batch, "tokens_generated": b.generated}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "smol", "context_length": served.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        served.check(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt_ids = await served.encode(render_chat(messages), "messages")
        return await respond(req, request, prompt_ids, chat_stop_ids(served.model), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served.check(req)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        prompt_ids = await served.encode(prompt, "prompt") or [EOT_ID]  # nothing: start a fresh document
        return await respond(req, request, prompt_ids, set(served.model.eos_token_ids), chat=False)

    async def respond(req, request, prompt_ids, stop_ids, chat):
        stop_ids = set() if req.ignore_eos else stop_ids
        stop_strings(req)  # checked before the request is queued
        seq, tokens = served.submit(prompt_ids, req, stop_ids)  # refused (400, 429) before any streaming starts
        request.state.completion_tokens = 0
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": served.name}

        def usage():
            n = request.state.completion_tokens
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def choice(text, finish, delta):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"content": text} if text or not delta else {}
            return {"index": 0, ("delta" if delta else "message"): body if delta else {"role": "assistant", **body},
                    "logprobs": None, "finish_reason": finish}

        pieces = served.generate(seq, tokens, req, stop_ids, request)
        if not req.stream:  # waits in line without a word, as OpenAI's API does
            text, finish = "", "length"
            async for piece, end in pieces:
                if piece is not None:
                    text, finish = text + piece, end
            return {**head, "choices": [choice(text, finish, delta=False)], "usage": usage()}

        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def events():
            def event(body):
                return f"data: {json.dumps(body)}\n\n"
            if chat:  # the role comes first, as OpenAI sends it
                yield event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
            async for piece, finish in pieces:
                if piece is None:  # an SSE comment: clients skip it, people and the page can read it
                    yield f": waiting, {finish} ahead\n\n"
                elif piece or finish:
                    yield event({**chunk, "choices": [choice(piece, finish, delta=True)]})
            if (req.stream_options or {}).get("include_usage"):
                yield event({**chunk, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def main(argv=None):
    p = Parser(prog="serve.py", description="Serve a model: a chat page and an OpenAI-compatible API.")
    add_model_flags(p, "serving")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model's id in the API (default: the checkpoint folder's name)")
    p.add_argument("--max_batch", type=int, default=16, help="requests decoded together, one row each (default 16)")
    p.add_argument("--max_waiting", type=int, default=64,
                   help="requests waiting for a row; past them: 429 (default 64)")
    p.add_argument("--cache_mb", type=int, default=None,
                   help="memory for every request's KV cache together, MiB (default: a quarter of the memory "
                        "free at start, at most 4096)")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="compile the batched decode step over a fixed block of max_batch rows, once per length "
                        "bucket (CUDA graphs on CUDA); auto: on CUDA only")
    p.add_argument("--api_key", default=os.environ.get("SMOL_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $SMOL_API_KEY, else none)")
    p.add_argument("--allow_origin", action="append", default=[],
                   help="a web origin (https://site.example, or *) whose pages may call this server; repeatable")
    p.add_argument("--allow_host", action="append", default=[],
                   help="another name this server may be called by (Host header); repeatable")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_batch", "max_waiting", "cache_mb"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "max_waiting" else 1):
            raise UserError(f"--{flag} must be {'at least 0' if flag == 'max_waiting' else 'positive'}, "
                            f"got {getattr(args, flag)}")
    sock = listen(args.host, args.port)  # first: a port in use is known before a model is loaded
    served, device, cache_mb = start_model(args)
    served.created = int(time.time())
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    kind = "chat" if served.chat else "base (completion; chat replies end at <|endoftext|> or <|im_end|>)"
    with torch.device("meta"):  # counted from the config: --quantize keeps the matrices as buffers
        n_params = SmolLM(served.model.config).num_params()
    dtype, why = pick_dtype(device, args.dtype)
    print(f"serving {served.name} ({kind}, {n_params:,} parameters, {device}, {dtype}: {why}) on {url}"
          + (f"  (the page: {url}/#key={args.api_key})" if args.api_key else ""), flush=True)
    fixed = served.batcher.fixed
    print(f"up to {args.max_batch} requests decode together, {args.max_waiting} more wait; KV cache budget "
          f"{cache_mb:,} MiB (about {(cache_mb << 20) // served.batcher.slot_bytes:,} tokens)"
          + (f"; compiled step over {fixed[0]} rows of {fixed[1]} positions" if fixed else ""), flush=True)
    hosts = host_names(host, args.allow_host)
    if not args.api_key and (hosts is None or not hosts & {"127.0.0.1", "::1"}):
        print(f"warning: serving on {host} without --api_key: anyone who can reach this address can use the "
              f"model", file=sys.stderr, flush=True)
    app = Access(create_app(served), hosts=hosts, origins=args.allow_origin, api_key=args.api_key,
                 max_body=MAX_BODY)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def start_model(args):
    """(served model, device, cache MiB): the model loaded, and its batcher running, in one
    thread of their own, so that every torch operation of the server runs in that thread
    (engine.Batcher.run says why); a mistake in the flags is a UserError here as usual."""
    ready = queue.Queue()

    def model_thread():
        try:
            model, device = load_from_flags(args)
            folder = args.out_dir if args.init_from == "resume" else args.init_from
            cache_mb = args.cache_mb or default_cache_mb(device)
            try:
                served = ServedModel(model, load_tokenizer(), args.name or os.path.basename(os.path.normpath(folder)),
                                     device, args.max_batch, cache_mb << 20, args.max_waiting,
                                     compile=use_compile(args.compile, device, long_lived=True), thread=False)
            except ValueError as e:  # a compiled block that the budget cannot hold
                raise UserError(f"--cache_mb {cache_mb}: {e} (--max_batch)") from None
        except BaseException as e:  # UserError, or a bug: main() reports it
            ready.put(e)
            return
        ready.put((served, device, cache_mb))
        served.batcher.run()

    threading.Thread(target=model_thread, name="model", daemon=True).start()
    result = ready.get()
    if isinstance(result, BaseException):
        raise result
    return result


def default_cache_mb(device):
    """A quarter of the memory free now (after the weights are loaded), at least 64 MiB, at most 4 GiB."""
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            free = 4 << 30  # not Linux: assume a small machine
    return max(64, min(4096, free // 4 >> 20))


def listen(host, port):
    """The listening socket, bound here rather than by uvicorn, which would log a bind
    failure as a traceback-like line and exit with its own status."""
    try:
        family, type_, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    return sock


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        fail(str(e))
