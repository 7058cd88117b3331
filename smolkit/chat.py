"""
Talking to a model: the chat format of SmolLM2-Instruct (ChatML), fitting a
conversation into the context, and token ids to text as it streams.
"""
from smol import EOT_ID, IM_END_ID

# SmolLM2-Instruct speaks ChatML: each turn is <|im_start|>ROLE\nTEXT<|im_end|>\n, and
# the model's own turn ends with <|im_end|> (id 2). The official chat template (stored
# with the instruct weights, e.g. as tokenizer.chat_template in their GGUF files) puts
# this system message first when a conversation does not begin with one.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant")
# render_chat as a Jinja template, for the programs that render chats themselves (the server's
# /tokenizer_info gives it to evaluators; GGUF files carry it for llama.cpp)
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def render_chat(messages, add_generation_prompt=True):
    """[{"role", "content"}, ...] -> prompt text, as the official template renders it;
    add_generation_prompt opens the assistant's turn for the model to write."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + list(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
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
