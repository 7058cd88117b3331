"""
Serve one model over HTTP: a chat page for people, an OpenAI-compatible API for programs.

    python serve.py --init_from path/to/SmolLM2-135M-Instruct   # then open http://127.0.0.1:8000
    python serve.py --out_dir out                                # a model trained here (out/ckpt.pt)

    GET  /                       the page: chat (instruct models) or completion (base models)
    POST /v1/chat/completions    messages -> reply, as OpenAI's API (stream: true for SSE)
    POST /v1/completions         prompt -> continuation
    GET  /v1/models
    GET  /health                 {"status": "ok", "model", "chat", "context_length", "active_requests": the
                                 requests generating now, "tokens_generated": every token the model has
                                 generated since the server started, for all requests together}

How requests share the model: one worker thread runs every model call, taking jobs
from one first-in-first-out queue. A request's job is "its next token" (the first one
also reads the prompt), and it queues the next job only once it has its token, so N
requests take turns token by token, a long prompt holds the model for its own prefill
and no longer, and a request whose client went away simply queues nothing more.
Needs fastapi and uvicorn: pip install -r requirements-serve.txt
"""
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from chat import ROLES, TextStream, chat_stop_ids, is_chat_model, render_chat
from common import HERE, Parser, UserError, add_model_flags, fail

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
from engine import Decoder, load_from_flags
from smol import EOT_ID


# ---- requests, as OpenAI's API defines them (the fields this server honours) ----
# strict: "5" is not 5 and 0 is not false; a client sending those has a bug worth hearing about

class Request_(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not in OpenAI's API (0 = off); llama.cpp's server and the page use it
    ignore_eos: bool = False  # not in OpenAI's API either (vLLM's): run to max_tokens, for benchmarks
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = None
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
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Request_):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt: no batches


UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """A request this server cannot serve: sent back as OpenAI sends its errors."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- the model, behind one worker thread ----

class ServedModel:
    """The model, its tokenizer and its name, behind one worker thread."""

    def __init__(self, model, tokenizer, name, device):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.decoder = Decoder(model)  # eager: every request gets a cache of its own
        self.context = model.config.max_position_embeddings
        self.chat = is_chat_model(model)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.active = 0  # requests generating now (GET /health)
        self.generated = 0  # tokens the model has generated since start, for every request (GET /health)

    def check(self, req):
        if req.model is not None and req.model != self.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server has '{self.name}' "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    def budget(self, req, n_prompt):
        """max_tokens, or all the room the context has left when none is asked for."""
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                f"{n_prompt}", param="messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                f"{n_prompt} and max_tokens asks for {wanted} more (at most {room})",
                           param="max_tokens", code="context_length_exceeded")
        return wanted or room

    async def generate(self, prompt_ids, req, stop_ids, request):
        """Yield (text, None) pieces as they are decoded, then (text, finish_reason) with
        finish_reason "stop" (a stop id or stop string) or "length". Also counts
        self.completion_tokens for usage."""
        max_tokens = self.budget(req, len(prompt_ids))
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
        generator = torch.Generator(self.device)
        generator.manual_seed(req.seed) if req.seed is not None else generator.seed()
        idx = torch.tensor([prompt_ids], device=self.device)  # (1, T)
        tokens = self.decoder.stream(idx, max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                   top_p=req.top_p, generator=generator, stop_ids=stop_ids)

        def next_id():  # runs in the worker: the model call and the copy of the id to the host
            token = next(tokens, None)
            if token is None:
                return None
            self.generated += 1  # only this thread writes it
            return token.item()

        loop = asyncio.get_running_loop()
        text, sent, finish = TextStream(self.tokenizer), 0, "length"
        out = ""  # decoded text so far; out[:sent] has been yielded
        self.active += 1
        try:
            for n in range(max_tokens):
                if n % 8 == 7 and await request.is_disconnected():
                    return
                token = await loop.run_in_executor(self.worker, next_id)
                if token is None:
                    break
                request.state.completion_tokens = n + 1
                if token in stop_ids:
                    finish = "stop"
                    break
                out += text.push(token)
                cut = min((i for i in (out.find(s, max(0, sent - len(s))) for s in stops) if i >= 0), default=-1)
                if cut >= 0:  # a stop string: the text ends before it
                    out, finish = out[:cut], "stop"
                    break
                # hold back a tail that could be the start of a stop string
                hold = max((k for s in stops for k in range(1, len(s)) if out.endswith(s[:k])), default=0)
                if len(out) - hold > sent:
                    yield out[sent:len(out) - hold], None
                    sent = len(out) - hold
            yield out[sent:], finish
        finally:
            self.active -= 1
            self.worker.submit(tokens.close)  # after any step still running; frees the KV cache


def create_app(served):
    app = FastAPI(title="smol", docs_url=None, redoc_url=None, openapi_url=None)
    with open(os.path.join(HERE, "serve.html"), encoding="utf-8") as f:
        page = f.read()

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body, status_code=e.status)

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
    async def server_error(request, e):  # a bug of ours: still an answer in the shape clients parse
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body,
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "chat": served.chat, "context_length": served.context,
                "active_requests": served.active, "tokens_generated": served.generated}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "smol", "context_length": served.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        served.check(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt_ids = served.tokenizer.encode(render_chat(messages)).ids
        return await respond(req, request, prompt_ids, chat_stop_ids(served.model), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served.check(req)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        prompt_ids = served.tokenizer.encode(prompt).ids or [EOT_ID]  # nothing: start a fresh document
        return await respond(req, request, prompt_ids, set(served.model.eos_token_ids), chat=False)

    async def respond(req, request, prompt_ids, stop_ids, chat):
        served.budget(req, len(prompt_ids))  # refuse before any streaming starts
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

        pieces = served.generate(prompt_ids, req, set() if req.ignore_eos else stop_ids, request)
        if not req.stream:
            text, finish = "", "length"
            async for piece, finish in pieces:
                text += piece
            return {**head, "choices": [choice(text, finish, delta=False)], "usage": usage()}

        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def events():
            def event(body):
                return f"data: {json.dumps(body)}\n\n"
            if chat:  # the role comes first, as OpenAI sends it
                yield event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
            async for piece, finish in pieces:
                if piece or finish:
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
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    sock = listen(args.host, args.port)  # first: a port in use is known before a model is loaded
    model, device = load_from_flags(args)
    folder = args.out_dir if args.init_from == "resume" else args.init_from
    name = args.name or os.path.basename(os.path.normpath(folder))
    served = ServedModel(model, load_tokenizer(), name, device)
    served.created = int(time.time())
    host, port = sock.getsockname()[:2]
    kind = "chat" if served.chat else "base (completion; chat replies end at <|endoftext|> or <|im_end|>)"
    print(f"serving {name} ({kind}, {model.num_params():,} parameters, {device}) on "
          f"http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning")).run(sockets=[sock])


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
