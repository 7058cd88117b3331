"""
Serve one model over HTTP: a chat page for people, an OpenAI-compatible API for programs.

    python -m server --init_from path/to/SmolLM2-135M-Instruct   # then open http://127.0.0.1:8000
    python -m server --out_dir out                                # a model trained here (out/ckpt.pt)

    GET  /                       the page: chat (instruct models) or completion (base models)
    POST /v1/chat/completions    messages -> reply, as OpenAI's API (stream: true for SSE)
    POST /v1/completions         prompt -> continuation; a list of prompts (text or token ids) -> one choice
                                 each; echo and logprobs score the prompt too (max_tokens 0: only that),
                                 as lm-evaluation-harness's local-completions asks (docs/evaluate.md)
    GET  /v1/models
    POST /tokenize, /detokenize  text <-> token ids with the server's tokenizer (as vLLM's)
    GET  /tokenizer_info         its special tokens and chat template
    GET  /health                 {"status": "ok", "model", "chat", "context_length", "active_requests":
                                 generating or waiting, "decoding": rows in the batch, "waiting",
                                 "decode_steps" and "last_batch": batched steps so far and the rows
                                 of the last one, "tokens_generated": every token generated since
                                 the server started, for all requests together, "prefill_passes":
                                 forward passes that read prompts (one a prompt, one per piece of a
                                 prompt scored for echo and logprobs)}

How requests share the model: continuous batching (server/batcher.py). Every request
being generated is one row of one batch, advanced by one batched decode step per
token; a new request joins after its prompt is read, a finished or abandoned one
leaves at once. --max_batch rows at most, --max_waiting requests in line behind them
(past that: 429), and one KV-cache budget for all rows together (--cache_mb). Who may
call, and how big a body may be, is access.py's job; what a request may hold and how
an answer is shaped, openai_api.py's (both beside this file). docs/chat-and-serve.md has the memory model and
measured throughput.
Needs fastapi and uvicorn: pip install -r requirements-serve.txt
"""
import asyncio
import importlib.util
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid

from server.access import Access, host_names
from smolkit.chat import StopStrings, TextStream, chat_stop_ids, is_chat_model, render_chat
from smolkit.common import Parser, UserError, add_model_flags, fail, pick_dtype, use_compile

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # name every package of the two that is missing, not the first one tried
    lacking = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None] or [e.name]
    fail(f"the server needs {' and '.join(lacking)}: pip install -r requirements-serve.txt")

import torch

from server.batcher import Batcher, Busy, Sequence
from server.openai_api import (MAX_BODY, ROLE_DELTA, APIError, CallReader, ChatRequest, CompletionRequest,
                               DetokenizeRequest, NamedToolChoice, TokenizeRequest, chat_choice, chat_delta,
                               chat_logprobs, completion_choice, completion_logprobs, invalid_request, sse_event, stop_strings, usage)
from smol import EOT_ID, SmolLM
from smolkit.data import load_tokenizer, token_bytes
from smolkit.decoding import ModelOverflow, load_from_flags
from smolkit.grammar import Constraint, GrammarError, json_grammar, tool_grammar
from smolkit.hf import tokenizer_config
from smolkit.models import model_name

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
        self.token_bytes = token_bytes(tokenizer)  # what each id stands for, for log-probabilities

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

    async def constrain(self, req, calls, stop_ids):
        """The grammar.Constraint that the reply follows (None: free text): the tool call of
        calls (called_tools), or response_format's JSON. Compiled off the event loop, within
        grammar.LIMITS; what cannot compile is a 400 naming the field."""
        fmt = req.response_format
        if calls is None and (fmt is None or fmt.type == "text"):
            return None
        param = "tools" if calls else "response_format"
        if req.ignore_eos:
            raise APIError(400, f"ignore_eos: a reply under {param} ends where its grammar does", param="ignore_eos")
        try:
            if calls:
                grammar = tool_grammar(*calls)
            else:
                grammar = json_grammar(fmt.json_schema.schema_ if fmt.json_schema else None)
            return await asyncio.to_thread(Constraint, grammar, self.tokenizer, stop_ids)
        except UserError as e:  # this server lacks the grammar library
            raise APIError(400, f"{param}: {e}", param=param, code="unsupported_parameter") from None
        except GrammarError as e:
            raise APIError(400, f"{param}: the grammar library cannot use this schema: {e}", param=param) from None

    def check_ids(self, ids, param):
        vocab = len(self.token_bytes)
        if (bad := next((i for i in ids if i >= vocab), None)) is not None:
            raise APIError(400, f"{param}: token id {bad} is not in this model's vocabulary (0..{vocab - 1})",
                           param=param)
        return ids

    def text(self, ids):
        """The text of some token ids, special tokens included (what echo sends back)."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

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
        return room if wanted is None else wanted

    def submit(self, prompts, req, stop_ids, logprobs=None, score_prompt=False, constraint=None):
        """Queue one request per prompt (ids), all admitted together or none; each one's
        tokens arrive on its own asyncio queue (then None, or an Exception if the model
        failed); constraint: the grammar every prompt's reply follows (each its own copy).
        Returns [(Sequence, queue)]."""
        loop, queued = asyncio.get_running_loop(), []
        for n, prompt_ids in enumerate(prompts):
            tokens = asyncio.Queue()
            seq = Sequence(prompt_ids, self.budget(req, len(prompt_ids)),
                           lambda token, tokens=tokens: loop.call_soon_threadsafe(tokens.put_nowait, token),
                           temperature=req.temperature, top_k=req.top_k or None, top_p=req.top_p,
                           seed=None if req.seed is None else (req.seed + n) % (1 << 64),  # a prompt's own stream
                           stop_ids=stop_ids, logprobs=logprobs, score_prompt=score_prompt,
                           constraint=constraint and (constraint.copy() if n else constraint))
            queued.append((seq, tokens))
        try:
            self.batcher.submit(*(seq for seq, _ in queued))
        except Busy as e:
            raise APIError(429, f"The server is busy ({e}); try again shortly", code="server_busy",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, f"This request does not fit in this server's memory: {e}; ask for fewer "
                                f"max_tokens", param="max_tokens", code="context_length_exceeded") from None
        return queued

    async def generate(self, seq, tokens, req, stop_ids, request, ids):
        """Yield (text, None) pieces as they are decoded, then (text, finish_reason) with
        finish_reason "stop" (a stop id or stop string) or "length". While the request waits
        for a row: (None, n), n the requests ahead of it in line, at once and every second.
        ids: a list that gets every token id generated, a stop id included."""
        text, stops, finish = TextStream(self.tokenizer), StopStrings(stop_strings(req)), "length"
        try:
            if (ahead := self.batcher.ahead(seq, for_a_row=True)) is not None:
                yield None, ahead  # every row is taken: say so before the client's read times out
            while True:
                if tokens.empty():  # a client that went away is noticed even while its request waits in line
                    try:
                        token = await asyncio.wait_for(tokens.get(), timeout=1.0)
                    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
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
                ids.append(token)
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
                if len(ids) % 16 == 0 and await request.is_disconnected():
                    return
            yield stops.held, finish  # the text held back in case a stop string began there
        finally:
            seq.cancelled = True  # done, stopped or abandoned: its row is free at the next step


def called_tools(req):
    """The tools a chat reply may call ([{"name", "parameters"}]; None: it answers in words),
    and whether it may answer in words instead ("auto"), from tools and tool_choice."""
    tools, choice = req.tools or [], req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"  # OpenAI's default
    if choice == "none":
        return None
    if not tools:
        raise APIError(400, "tool_choice: there are no tools to call", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
        if not tools:
            raise APIError(400, f"tool_choice: no function named '{choice.function.name}' in tools",
                           param="tool_choice")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format: a reply that may call a tool is written in the tool's form; "
                            "leave response_format out or set tool_choice to \"none\"", param="response_format")
    return [{"name": t.function.name, "parameters": t.function.parameters} for t in tools], choice == "auto"


# ---- the app: its served model and page are set at start-up (main) in app.state ----

app = FastAPI(title="smol", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def api_error(request, e):
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def request_validation_error(request, e):
    return JSONResponse(invalid_request(e.errors()[0]).body, status_code=400)


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
async def index(request: Request):
    return request.app.state.page


@app.get("/health")
async def health(request: Request):
    served = request.app.state.served
    b = served.batcher
    return {"status": "ok", "model": served.name, "chat": served.chat, "context_length": served.context,
            "active_requests": b.active, "decoding": len(b.rows), "waiting": len(b.waiting),
            "decode_steps": b.steps, "last_batch": b.last_batch, "tokens_generated": b.generated,
            "prefill_passes": b.prefill_passes}


@app.get("/v1/models")
async def models(request: Request):
    served = request.app.state.served
    return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                        "owned_by": "smol", "context_length": served.context}]}


@app.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    served = request.app.state.served
    served.check(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    tools = [t.model_dump(exclude_unset=True) for t in req.tools or []]  # as the client wrote them
    prompt_ids = await served.encode(render_chat([m.turn() for m in req.messages], tools=tools), "messages")
    return await respond(served, req, request, [prompt_ids], chat_stop_ids(served.model), chat=True,
                         logprobs=(req.top_logprobs or 0) if req.logprobs else None)


@app.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    served = request.app.state.served
    served.check(req)
    prompts = req.prompts()
    if len(prompts) > served.batcher.max_waiting:
        raise APIError(400, f"prompt: this server takes at most {served.batcher.max_waiting} prompts in one "
                            f"request (--max_waiting), got {len(prompts)}", param="prompt")
    # text is tokenized here (nothing: start a fresh document); ids are taken as they are
    prompts = [served.check_ids(p, "prompt") if isinstance(p, list) else
               await served.encode(p, "prompt") or [EOT_ID] for p in prompts]
    return await respond(served, req, request, prompts, set(served.model.eos_token_ids), chat=False,
                         echo=req.echo, logprobs=req.logprobs)


@app.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    served = request.app.state.served
    served.check(req)
    ids = await served.encode(req.prompt, "prompt")
    return {"count": len(ids), "max_model_len": served.context, "tokens": ids}


@app.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    served = request.app.state.served
    served.check(req)
    return {"prompt": served.text(served.check_ids(req.tokens, "tokens"))}


@app.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return tokenizer_config(request.app.state.served.model.config)


# ---- the two completion routes' answers ----

async def respond(served, req, request, prompts, stop_ids, chat, echo=False, logprobs=None):
    """The request queued, one row per prompt (ids); then the whole answer as JSON or,
    with stream, its pieces as server-sent events."""
    req.refuse_inert()
    stop_strings(req)  # checked before the request is queued
    if req.stream and (len(prompts) > 1 or echo or logprobs is not None):
        raise APIError(400, "stream: this server streams one prompt without echo or logprobs; ask for these "
                            "without stream", param="stream")
    calls = called_tools(req) if chat else None
    constraint = await served.constrain(req, calls, stop_ids)  # last: the one check that compiles something
    stop_ids = set() if req.ignore_eos else stop_ids
    # refused (400, 429) before any streaming starts
    queued = served.submit(prompts, req, stop_ids, logprobs, score_prompt=echo and logprobs is not None,
                           constraint=constraint)
    # a reply that may be a tool call is read as one; finishing it is "tool_calls", or "stop" for a
    # function the request named, as OpenAI's API says
    reader = CallReader if calls else None
    call_finish = "stop" if isinstance(getattr(req, "tool_choice", None), NamedToolChoice) else "tool_calls"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": served.name}
    if req.stream:
        (seq, tokens), ids = queued[0], []
        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        pieces = served.generate(seq, tokens, req, stop_ids, request, ids)
        events = stream_events(pieces, chunk, chat, (req.stream_options or {}).get("include_usage"), prompts, ids,
                               reader and reader(), call_finish)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:  # waits in line without a word, as OpenAI's API does
        done = await asyncio.gather(*(collect_completion(served, seq, tokens, req, stop_ids, request)
                                      for seq, tokens in queued))
    finally:
        for seq, _ in queued:  # one prompt failed: the others stop too
            seq.cancelled = True
    choices = []
    for i, ((seq, _), prompt, (text, finish, ids)) in enumerate(zip(queued, prompts, done)):
        shown = None if logprobs is None else choice_logprobs(served, seq, prompt, ids, chat, echo, stop_ids)
        if reader:
            (call := reader()).push(text, last=True)
            if call.name is not None:
                choices.append(chat_choice(None, call_finish if call.complete else finish, i, shown, call))
                continue
        choices.append(chat_choice(text, finish, i, shown) if chat else
                       completion_choice(served.text(prompt) + text if echo else text, finish, i, shown))
    return {**head, "choices": choices, "usage": usage(prompts, sum(len(ids) for _, _, ids in done))}


async def collect_completion(served, seq, tokens, req, stop_ids, request):
    """One prompt's whole completion: (text, finish_reason, the token ids generated)."""
    text, finish, ids = "", "length", []
    async for piece, end in served.generate(seq, tokens, req, stop_ids, request, ids):
        if piece is not None:  # None: still waiting in line, which a whole answer does not tell
            text, finish = text + piece, end
    return text, finish, ids


def choice_logprobs(served, seq, prompt, ids, chat, echo, stop_ids):
    """The logprobs of one choice, from the scores its Sequence kept: a chat reply's own
    tokens; a completion's tokens, after the prompt's when it was scored (echo and logprobs)."""
    scores = seq.scores
    if chat:  # the reply's tokens, not the stop id that ended it
        kept = ids[:-1] if ids and ids[-1] in stop_ids else ids
        return chat_logprobs(served.token_bytes, kept, scores[:len(kept)])
    scored = len(prompt) - 1 if seq.score_prompt else 0  # the prompt's scores come first
    prompt_scores = [(None, None)] + scores[:scored] if seq.score_prompt else []
    return completion_logprobs(served.token_bytes, (prompt if echo else []) + ids,
                               prompt_scores + scores[scored:scored + len(ids)])


async def stream_events(pieces, chunk, chat, include_usage, prompts, ids, call=None, call_finish=None):
    """A streamed answer's server-sent events: each piece in a chunk, then (include_usage)
    the token counts, of the prompts and of the ids that generating the pieces filled in.
    call: a CallReader, when the reply may be a tool call (which then streams as one)."""
    if chat:  # the role comes first, as OpenAI sends it
        yield sse_event({**chunk, "choices": [ROLE_DELTA]})
    async for piece, finish in pieces:
        if piece is None:  # an SSE comment: clients skip it, people and the page can read it
            yield f": waiting, {finish} ahead\n\n"
        elif call is not None:
            deltas = call.push(piece, last=finish is not None)
            if finish is not None and call.complete:
                finish = call_finish
            for delta in deltas:
                yield sse_event({**chunk, "choices": [chat_delta(None, None, delta)]})
            if finish is not None:
                yield sse_event({**chunk, "choices": [chat_delta(None, finish)]})
        elif piece or finish:
            yield sse_event({**chunk, "choices": [chat_delta(piece, finish) if chat else
                                                  completion_choice(piece, finish)]})
    if include_usage:
        yield sse_event({**chunk, "choices": [], "usage": usage(prompts, len(ids))})
    yield "data: [DONE]\n\n"


def build_parser():
    p = Parser(prog="python -m server", description="Serve a model: a chat page and an OpenAI-compatible API.")
    add_model_flags(p, "serving")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None,
                   help="the model's id in the API (default: the model's folder, file or hub name)")
    p.add_argument("--max_batch", type=int, default=16, help="requests decoded together, one row each (default 16)")
    p.add_argument("--max_waiting", type=int, default=64,
                   help="requests waiting for a row, at least 1; past them: 429 (default 64)")
    p.add_argument("--cache_mb", type=int, default=None,
                   help="memory for every request's KV cache together, MiB (default: a quarter of the memory "
                        "free at start, at most 4096)")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="compile the batched decode step over a fixed block of max_batch rows, once per length "
                        "bucket (CUDA graphs on CUDA); auto: on CUDA only")
    p.add_argument("--api_key", default=os.environ.get("SMOL_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/ and the tokenizer routes (default: "
                        "$SMOL_API_KEY, else none)")
    p.add_argument("--allow_origin", action="append", default=[],
                   help="a web origin (https://site.example, or *) whose pages may call this server; repeatable")
    p.add_argument("--allow_host", action="append", default=[],
                   help="another name this server may be called by (Host header); repeatable")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_batch", "max_waiting", "cache_mb"):  # every request waits in line for a row, if only a step
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
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
          + (f"; compiled step over {fixed[0]} rows of {fixed[1]} positions, its {served.buckets} length "
             f"buckets compiled before listening ({served.compile_s:.0f} s)" if fixed else ""), flush=True)
    hosts = host_names(host, args.allow_host)
    if not args.api_key and (hosts is None or not hosts & {"127.0.0.1", "::1"}):
        print(f"warning: serving on {host} without --api_key: anyone who can reach this address can use the "
              f"model", file=sys.stderr, flush=True)
    app.state.served = served
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html"), encoding="utf-8") as f:
        app.state.page = f.read()
    guarded = Access(app, hosts=hosts, origins=args.allow_origin, api_key=args.api_key, max_body=MAX_BODY)
    uvicorn.Server(uvicorn.Config(guarded, log_level="warning")).run(sockets=[sock])


def start_model(args):
    """(served model, device, cache MiB): the model loaded, and its batcher running, in one
    thread of their own, so that every torch operation of the server runs in that thread
    (batcher.Batcher.run says why); a mistake in the flags is a UserError here as usual."""
    ready = queue.Queue()

    def model_thread():
        try:
            model, device = load_from_flags(args)
            cache_mb = args.cache_mb or default_cache_mb(device)
            try:
                served = ServedModel(model, load_tokenizer(), args.name or model_name(args.init_from, args.out_dir),
                                     device, args.max_batch, cache_mb << 20, args.max_waiting,
                                     compile=use_compile(args.compile, device, long_lived=True), thread=False)
            except ValueError as e:  # a compiled block that the budget cannot hold
                raise UserError(f"--cache_mb {cache_mb}: {e} (--max_batch)") from None
            t0 = time.perf_counter()  # compiled: every bucket now, not in the first requests to reach it
            served.buckets, served.compile_s = served.batcher.compile_buckets(), time.perf_counter() - t0
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
