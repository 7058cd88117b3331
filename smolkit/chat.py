"""
Talking to a model: the chat format of SmolLM2-Instruct (ChatML), fitting a
conversation into the context, and token ids to text as it streams.
"""
import json

from smol import EOT_ID, IM_END_ID

# SmolLM2-Instruct speaks ChatML: each turn is <|im_start|>ROLE\nTEXT<|im_end|>\n, and
# the model's own turn ends with <|im_end|> (id 2). The official chat template (stored
# with the instruct weights, e.g. as tokenizer.chat_template in their GGUF files) puts
# this system message first when a conversation does not begin with one.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant")  # the turns of a conversation (the API adds "tool")
# Tools (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}])
# have no place in SmolLM2's template, so this one gives them one: listed in the system
# message, a call written as <tool_call>{"name":...,"arguments":{...}}</tool_call> at the end of
# an assistant turn (the form grammar.py makes the model write), a tool's result sent back as a
# user turn in <tool_response> tags
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # around a call; grammar.py makes the model write them
TOOLS_INTRO = ("\n\nYou may call one of these functions, each given with a JSON schema of its arguments:\n"
               "<tools>")
TOOLS_OUTRO = ("\n</tools>\nTo call one, answer with only " + CALL_OPEN + "{\"name\":NAME,\"arguments\":{...}}"
               + CALL_CLOSE + ". Its result comes back in <tool_response></tool_response>.")
# render_chat as a Jinja template, for the programs that render chats themselves (the server's
# /tokenizer_info gives it to evaluators; GGUF files carry it for llama.cpp; transformers'
# apply_chat_template, whose tojson is json.dumps as render_chat calls it, renders tools alike)
CHAT_TEMPLATE = (
    "{%- set ns = namespace(tools='') %}"
    "{%- if tools %}{% set ns.tools = '" + TOOLS_INTRO.replace("\n", "\\n") + "' %}"
    "{% for tool in tools %}{% set ns.tools = ns.tools + '\\n' + tool['function'] | tojson %}{% endfor %}"
    "{% set ns.tools = ns.tools + '" + TOOLS_OUTRO.replace("\n", "\\n") + "' %}{% endif %}"
    "{%- if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "' + ns.tools + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{%- if loop.first and message['role'] == 'system' %}{% set content = content + ns.tools %}{% endif %}"
    "{%- if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + content }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{ '" + CALL_OPEN + "{\"name\":\"' + call['function']['name'] + '\",\"arguments\":' }}"
    "{%- if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{%- else %}{{ call['function']['arguments'] | tojson }}{% endif %}{{ '}" + CALL_CLOSE + "' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tool_call_text(name, arguments):
    """A call as an assistant turn holds it; arguments: a JSON string, or a dict."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{CALL_OPEN}{{"name":"{name}","arguments":{args}}}{CALL_CLOSE}'


def render_chat(messages, add_generation_prompt=True, tools=None):
    """[{"role", "content"}, ...] -> prompt text, as the official template renders it;
    add_generation_prompt opens the assistant's turn for the model to write. tools, and
    messages with "tool_calls" or role "tool", in OpenAI's shapes: as CHAT_TEMPLATE says."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + list(messages)
    listed = "" if not tools else \
        TOOLS_INTRO + "".join("\n" + json.dumps(t["function"], ensure_ascii=False) for t in tools) + TOOLS_OUTRO
    text = ""
    for i, m in enumerate(messages):
        content = (m.get("content") or "") + (listed if i == 0 else "")
        if m["role"] == "tool":
            text += f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
            continue
        calls = "".join(tool_call_text(c["function"]["name"], c["function"]["arguments"])
                        for c in m.get("tool_calls") or [])
        text += f"<|im_start|>{m['role']}\n{content}{calls}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def is_chat_model(model):
    """Trained for chat: its turns end with <|im_end|> (the instruct checkpoints say so
    in their eos_token_id; base models and this project's own say <|endoftext|>)."""
    return IM_END_ID in model.eos_token_ids


def chat_stop_ids(model):
    """Where a reply ends: a turn ends at <|im_end|> whatever the checkpoint declares,
    and a base model's text at <|endoftext|>."""
    return set(model.eos_token_ids) | {IM_END_ID, EOT_ID}


def fit_chat(messages, tokenizer, room):
    """Encode a conversation for generation, dropping its oldest turns (never the
    system message nor the last message) until the prompt fits in room tokens.
    Returns (prompt ids, messages kept), or (None, messages) if even the last message
    alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    # cut before a user turn, so that what is kept still opens with the user
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" or i == len(turns) - 1] or [0]
    for start in starts:
        ids = tokenizer.encode(render_chat(system + turns[start:])).ids
        if len(ids) <= room:
            return ids, system + turns[start:]
    return None, messages


class TextStream:
    """Token ids in, text out as soon as it is whole. A character may take several
    byte-level tokens (an emoji is four), and decoding only some of them gives U+FFFD:
    such ids wait until the character is complete. Special tokens print as nothing."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token_id):
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:  # a character is at most 4 bytes; give up after 8
            return ""
        self.pending = []
        return text


class StopStrings:
    """Finds the first of some stop strings in text that arrives in pieces, in time
    linear in the text: each string keeps how much of it the text ends with (the
    Knuth-Morris-Pratt automaton), so no piece is ever searched twice.
    push(piece) -> (text safe to send, stopped): text that might still begin a stop
    string is held back until the next piece settles it; when a stop string
    completes, everything before it is returned and stopped is True. The text stops at
    the first character where a stop string ends, as a stream must."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fail = [self._failure(s) for s in self.stops]  # fail[j]: the longest proper border of s[:j+1]
        self.matched = [0] * len(self.stops)  # how many characters of each stop string the text ends with
        self.held = ""  # text not yet returned: at most the longest stop string
        self.fallbacks = 0  # automaton steps back, all strings: never more than the characters pushed, per string

    @staticmethod
    def _failure(s):
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            k += s[i] == s[k]
            fail[i] = k
        return fail

    def push(self, piece):
        for n, ch in enumerate(piece):
            for i, s in enumerate(self.stops):
                k = self.matched[i]
                while k and (k == len(s) or ch != s[k]):
                    k = self.fail[i][k - 1]
                    self.fallbacks += 1
                self.matched[i] = k + (ch == s[k])
            ended = [len(s) for s, k in zip(self.stops, self.matched) if k == len(s)]
            if ended:  # a stop string ends at this character (the longest, if several): cut before it
                return (self.held + piece[:n + 1])[:-max(ended)], True
        text = self.held + piece
        keep = max(self.matched, default=0)  # the tail that may begin a stop string
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False
