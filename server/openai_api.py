"""
The OpenAI API's shapes, as the server speaks them: the requests and their bounds, the
errors, the choices and usage of an answer, the log-probabilities and the server-sent
events. Nothing here runs the model: app.py fills these shapes with what its batcher
generates. The reference is OpenAI's API (platform.openai.com/docs/api-reference), with
the extensions that vLLM's and llama.cpp's servers add and that evaluators send.
"""
import codecs
import json
import re
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.access import error_body
from smolkit.chat import CALL_CLOSE, CALL_OPEN, ROLES

# what one request may ask for: every bound answers a client's mistake with a 400, not a 500
MAX_BODY = 1 << 20  # bytes of JSON (413 past it): a whole context of text fits many times over
MAX_MESSAGES = 1024
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # OpenAI's API allows 4; evaluators add the eos string to a task's own
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each one a row of the batch, admitted together)
MAX_LOGPROBS = 20  # the likeliest tokens a scored position may list, as OpenAI's API allows
MAX_TOOLS = 128  # tools offered, or calls sent back, in one request (OpenAI's limit on tools)
# fields of OpenAI's API (or vLLM's) that would change the answer and that this server does not
# implement: accepted at the value that changes nothing, else refused with a 400 naming them
INERT = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {}, "best_of": 1,
         "suffix": "", "min_tokens": 0}


class APIError(Exception):
    """A request this server cannot serve: sent back as OpenAI sends its errors."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, code, type, param)
        self.headers = headers


# ---- requests, as OpenAI's API defines them (the fields this server honours) ----
# strict: "5" is not 5 and 0 is not false; a client sending those has a bug worth hearing about

class SamplingRequest(BaseModel):
    """What both completion routes share: which model, how many tokens, how to sample, when to stop."""
    model_config = ConfigDict(strict=True, extra="forbid")  # a field this server does not know: 400, by name
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
    user: str | None = None  # OpenAI's id of the client's end user: changes nothing
    presence_penalty: float | None = None  # the rest: only at their INERT value
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None
    min_tokens: int | None = None

    def refuse_inert(self):
        for name, inert in INERT.items():
            value = getattr(self, name, None)
            if value is not None and value != inert:
                raise APIError(400, f"{name}: this server does not implement it (only {json.dumps(inert)}, or "
                                    f"leave it out)", param=name, code="unsupported_parameter")


class Strict(BaseModel):
    """A part of a request: strict types, as the requests' own fields."""
    model_config = ConfigDict(strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(Strict):
    role: Literal[ROLES + ("tool",)]
    content: str | list[TextPart] | None = None  # None only beside tool_calls
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # an assistant's calls, sent back
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None  # who speaks (OpenAI's API): changes nothing

    @model_validator(mode="after")
    def complete(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content is needed (null only in an assistant message with "
                                                 "tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("tool_call_id", "a tool message needs the tool_call_id it answers")
        return self

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def turn(self):
        """The message as chat.render_chat takes it."""
        turn = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return turn


# ---- structured output: response_format, tools and tool_choice ----

class JSONSchemaFormat(Strict):
    name: str = Field(max_length=64)
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the schema is always kept: constrained decoding cannot do otherwise
    description: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def complete(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("json_schema", "json_schema is given with type json_schema, and only then")
        return self


class Function(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule: nothing to escape in a call's JSON
    description: str | None = None
    parameters: dict  # a JSON schema of the arguments; OpenAI makes it optional, a grammar needs one
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False  # each token of the reply with its log-probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # ... and the N likeliest (needs logprobs)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    # how the reply may call them (OpenAI's default: "auto" with tools, "none" without)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # at most one call a reply, which either value allows


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    # one prompt or a list, each text or token ids: one choice per prompt, in order
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(None, ge=0, lt=1 << 31)  # 0: nothing generated (echo and logprobs: scoring)
    echo: bool = False  # the prompt comes back before the completion (and is scored, with logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's log-probability and the N likeliest
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None  # as vLLM extends its completions

    @field_validator("prompt", mode="before")
    @classmethod
    def plain_mistakes(cls, prompt):  # said plainly, before each member of the union says it its own way
        if not isinstance(prompt, list):
            return prompt
        if prompt == [] or [] in prompt:
            raise PydanticCustomError("empty", "a prompt may be a string or token ids, never an empty list")
        ids = prompt if isinstance(prompt[0], int) else [i for p in prompt if isinstance(p, list) for i in p]
        if any(isinstance(i, int) and i < 0 for i in ids):
            raise PydanticCustomError("negative", "token ids are 0 or more")
        if not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise PydanticCustomError("too_many", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return prompt

    def prompts(self):
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return self.prompt


class TokenizeRequest(BaseModel):  # as vLLM's /tokenize
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # either way: cosmo2 adds no special tokens to a text


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def stop_strings(req):
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-int"}


def invalid_request(err):
    """The APIError (400) for pydantic's first complaint about a request body."""
    # the field's path, e.g. messages.0.content, less "body" and the union member that
    # pydantic tried ("str", "list[TextPart]"), which is no field of the request
    loc = [str(x) for x in err["loc"]
           if x != "body" and not (isinstance(x, str) and (x in UNION_MEMBERS or "[" in x))]
    if err["type"] == "json_invalid":
        reason = err.get("ctx", {}).get("error", "parse error")
        message, param = f"The request body is not valid JSON ({reason})", None
    elif err["type"] == "missing" and not loc:
        message, param = "The request needs a JSON body", None
    elif err["type"] == "extra_forbidden":
        param = ".".join(loc)
        message = f"{param}: this server does not know this field"
    else:
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param)


# ---- answers: the pieces of a response body ----

def usage(prompts, completion_tokens):
    """An answer's token counts; prompts: the token ids of each."""
    n_prompt = sum(len(p) for p in prompts)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
            "total_tokens": n_prompt + completion_tokens}


def completion_choice(text, finish, index=0, logprobs=None):
    """One choice of /v1/completions: a whole completion, or a piece of a streamed one."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(text, finish, index=0, logprobs=None, call=None):
    """One choice of a whole chat reply: its text, or (call) the CallReader of a tool call."""
    message = {"role": "assistant", "content": text} if call is None else \
        {"role": "assistant", "content": None, "tool_calls": [call.whole()]}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_delta(text, finish, delta=None):
    """One choice of a streamed chat reply: the next piece of its text, if any (the last may have
    none), or a delta of another kind (a tool call's)."""
    delta = delta or ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


class CallReader:
    """A reply decoded under a tool grammar (smolkit/grammar.py), read as it streams: a call,
    <tool_call>{"name":NAME,"arguments":ARGS}</tool_call>, or plain text (which tool_choice
    "auto" allows, and which never begins with "<"). push(piece) -> the stream's deltas in
    OpenAI's shape: text as content; a call's id and name once the name is whole, then its
    arguments in pieces. The call's last characters, which may be its closing "}</tool_call>",
    are held back until the next piece or the end (last=True) says whether they are."""
    HEAD = re.compile(re.escape(CALL_OPEN) + r'\{"name":"([A-Za-z0-9_-]+)","arguments":')
    TAIL = "}" + CALL_CLOSE

    def __init__(self):
        self.id, self.text, self.name, self.start, self.sent = "call_" + uuid.uuid4().hex[:24], "", None, 0, 0

    @property
    def is_call(self):
        return self.text.startswith("<")

    @property
    def complete(self):
        return self.name is not None and self.text.endswith(self.TAIL)

    def _end(self, last):
        return len(self.text) - len(self.TAIL) if not last or self.complete else len(self.text)

    def push(self, piece, last=False):
        self.text += piece
        if not self.is_call:
            return [{"content": piece}] if piece else []
        deltas = []
        if self.name is None:
            if not (head := self.HEAD.match(self.text)):  # cut short before its name is whole: words after all
                return [{"content": self.text}] if last else []
            self.name, self.start = head.group(1), head.end()
            deltas.append({"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                           "function": {"name": self.name, "arguments": ""}}]})
        args = self.text[self.start + self.sent:max(self.start + self.sent, self._end(last))]
        self.sent += len(args)
        if args:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": args}}]})
        return deltas

    def whole(self):
        """The call as a whole message holds it (the reply read to its end)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.text[self.start:self._end(True)]}}


# a streamed chat reply's first choice: the role, before any text, as OpenAI sends it
ROLE_DELTA = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def sse_event(body):
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body)}\n\n"


def token_text(token_bytes, token_id):
    """A token's own text; a token holding part of a character shows U+FFFD for it."""
    return token_bytes[token_id].decode("utf-8", errors="replace")


def completion_logprobs(token_bytes, ids, scores):
    """The completions API's logprobs of the tokens ids, scores[i] = (logprob, top) for
    ids[i] ((None, None) for a prompt's first token, which nothing predicts): the top
    ones as {text: logprob}, the token itself among them as OpenAI's API has it, and
    where each token's text starts (a character split over tokens counts at its last)."""
    utf8, at, offsets, tops = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0, [], []
    for token_id, (lp, top) in zip(ids, scores):
        offsets.append(at)
        at += len(utf8.decode(token_bytes[token_id]))
        if top is None:
            tops.append(None)
            continue
        shown = {}
        for i, value in top + [(token_id, lp)]:
            shown.setdefault(token_text(token_bytes, i), value)  # two ids may decode alike: the likelier one
        tops.append(shown)
    return {"tokens": [token_text(token_bytes, i) for i in ids], "token_logprobs": [lp for lp, _ in scores],
            "top_logprobs": tops, "text_offset": offsets}


def chat_token_logprob(token_bytes, token_id, lp):
    return {"token": token_text(token_bytes, token_id), "logprob": lp, "bytes": list(token_bytes[token_id])}


def chat_logprobs(token_bytes, ids, scores):
    """The chat API's logprobs: per token its text, logprob, bytes and the top ones."""
    return {"content": [{**chat_token_logprob(token_bytes, i, lp),
                         "top_logprobs": [chat_token_logprob(token_bytes, j, v) for j, v in top]}
                        for i, (lp, top) in zip(ids, scores)]}
