"""
Constrained decoding: replies that follow a JSON schema, or that call a tool, from a model too
small to keep to a format on its own. At every step the tokens that would break the grammar
are masked out of the logits before the draw, so the reply always parses (unless max_tokens
cuts it short). The grammar library is llguidance (bench/NOTES.md, entry 24, says why): it
compiles a schema against the tokenizer and gives each step's allowed tokens as a bitmask.

A tool call is written as <tool_call>{"name":...,"arguments":{...}}</tool_call>, the form
chat.py shows the model in its system message; tool_choice picks the grammar:
"required" and a named function allow only a call, "auto" a call or plain text.
"""
import json
from functools import lru_cache

import torch

from smolkit.chat import CALL_CLOSE, CALL_OPEN
from smolkit.common import UserError

# compact JSON: a small model under a grammar that allows whitespace can fill the reply with it
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# what one grammar may cost: compiling it (the lexer's fuel, ~50k a millisecond: about 100 ms,
# off the server's event loop) and each step's mask (~14k a millisecond: at most about 15 ms a row)
LIMITS = dict(initial_lexer_fuel=5_000_000, step_lexer_fuel=200_000, max_grammar_size=200_000)
MASKED = -1e30  # a masked logit: finite, since sample_next reads inf or NaN as an overflow, yet exp() of it is 0


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile (or that is over LIMITS)."""


def llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance: pip install llguidance "
                        "(pip install -r requirements-serve.txt)") from None
    return llguidance


@lru_cache(maxsize=4)
def _tokenizer(tokenizer, eos_ids):
    """llguidance's view of a tokenizers.Tokenizer, built from its JSON (~0.2 s: kept)."""
    return llguidance().LLTokenizer(tokenizer.to_str(), eos_token=list(eos_ids))


def one_line(error):
    """llguidance's error, which may draw a caret under a pattern over several lines, as one line."""
    return " ".join(line.strip() for line in error.splitlines() if line.strip().strip("^"))


def json_grammar(schema=None):
    """The grammar of one JSON value of this schema (None: any JSON object), compact."""
    lib = llguidance()
    try:
        return lib.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is None else schema,
                                                      overrides=COMPACT)
    except ValueError as e:
        raise GrammarError(one_line(str(e))) from None


def call_schema(tool):
    """A call of one tool {"name", "parameters"} as JSON: its name, then its arguments."""
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_grammar(tools, text_too=False):
    """One call of one of tools ([{"name", "parameters"}]) in its <tool_call> tags; text_too
    (tool_choice "auto"): or plain text instead, which then may not begin with "<", the one
    character that tells a call from text at once, so a stream knows which it is reading."""
    schema = {"anyOf": [call_schema(t) for t in tools]} if len(tools) > 1 else call_schema(tools[0])
    call = f'"{CALL_OPEN}" %json {json.dumps({**schema, "x-guidance": COMPACT})} "{CALL_CLOSE}"'
    lark = f"start: {call}" + (" | TEXT\nTEXT: /([^<][\\s\\S]*)?/" if text_too else "")
    return llguidance().LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One reply's grammar state: which tokens may come next, given the tokens drawn so far.
    tokenizer: a tokenizers.Tokenizer; stop_ids: the tokens that end the reply, the only
    ones allowed once the grammar is complete. Raises GrammarError if it does not compile."""

    def __init__(self, grammar, tokenizer, stop_ids):
        lib = llguidance()
        self.matcher = lib.LLMatcher(_tokenizer(tokenizer, tuple(sorted(stop_ids))), grammar,
                                     log_level=0, limits=lib.LLParserLimits(**LIMITS))
        if self.matcher.is_error():
            raise GrammarError(one_line(self.matcher.get_error()))

    def copy(self):
        """The same grammar, as far along, for another reply (compiled once for many prompts)."""
        other = object.__new__(Constraint)
        other.matcher = self.matcher.deep_copy()
        return other

    def advance(self, token):
        """Take the token drawn (always one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: "
                               f"{self.matcher.get_error()}")


def masked_logits(logits, constraints):
    """logits (n, V), with each row's disallowed tokens at MASKED where constraints[i] is a
    Constraint (None: a free row, untouched). The masks of all constrained rows are computed
    together, on the CPU's threads; the free rows cost nothing. Returns logits itself when
    no row is constrained, else an fp32 copy."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    n, V = len(rows), logits.size(1)
    bits = torch.zeros(n, (V + 31) // 32, dtype=torch.int32)  # (n, V/32): bit j of word w allows token 32w + j
    _executor().unsafe_compute_mask_ptr([(constraints[i].matcher, k) for k, i in enumerate(rows)],
                                        bits.data_ptr(), bits.size(1) * 4, n)
    bits = bits.to(logits.device)  # 6 KB a row: the step's one extra copy to the device
    allowed = (bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=bits.device)) & 1  # (n, V/32, 32)
    allowed = allowed.view(n, -1)[:, :V].bool()  # (n, V)
    logits = logits.float().clone()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, MASKED)
    return logits


@lru_cache(maxsize=1)
def _executor():
    return llguidance().LLExecutor()
