"""
Preference tuning (Direct Preference Optimization, Rafailov et al. 2023): the stage after
fine-tuning in the recipe that made SmolLM2-Instruct. A .jsonl file holds one pair a line,
in TRL's two conversational forms:

    {"prompt": [messages...], "chosen": [assistant message(s)], "rejected": [assistant message(s)]}
    {"chosen": [whole conversation], "rejected": [whole conversation]}  # the shared turns are the prompt

Each reply is rendered after its prompt as fine-tuning renders a conversation (chat.py's
ChatML, the default system prompt included) and its targets are those of fine-tuning: the
reply's assistant tokens and their closing <|im_end|>. TRL's own tokenisation also counts
the newline after the last <|im_end|>; tests/test_preferences.py gives TRL these ids and
targets and gets the same loss.

A reply's log-probability log p(y|x) is the sum over its targets. Against a frozen reference
(the starting model, scored once before training: smolkit/samplers.py's PairSampler), a
reply's implicit reward is beta * (log pi(y|x) - log ref(y|x)) and the loss of a pair

    -log sigmoid(reward(chosen) - reward(rejected))

is small when the model raises the chosen reply's probability against the rejected one's,
relative to where the reference started.
"""
import os

import torch
import torch.nn.functional as F

from smolkit.common import UserError
from smolkit.conversations import check_turns, encode, lay_out, load_conversations, require_replies
from smolkit.data import jsonl_records

PAIR_FORM = '{"prompt": [...], "chosen": [...], "rejected": [...]}, or no "prompt" and both replies begin with it'


def check_pair(record, where):
    """(prompt, chosen, rejected): the message lists of one preference record, checked; in
    the implicit form the turns both replies begin with are the prompt."""
    if isinstance(record, dict) and "messages" in record:
        raise UserError(f"{where} is a conversation, but the file's first record is a preference pair; "
                        f"a file holds one kind")
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= record.keys():
        lacking = "chosen" if not isinstance(record, dict) or "chosen" not in record else "rejected"
        raise UserError(f"{where} has no \"{lacking}\"; each line must be {PAIR_FORM}")
    chosen = check_turns(record["chosen"], f"{where}, chosen", "chosen")
    rejected = check_turns(record["rejected"], f"{where}, rejected", "rejected")
    if "prompt" in record:
        prompt = check_turns(record["prompt"], f"{where}, prompt", "prompt")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        differs = next((m for m in (chosen[:1] + rejected[:1]) if m["role"] != "assistant"), None)
        if differs is not None:
            raise UserError(f"{where}: chosen and rejected differ at message {shared + 1}, a {differs['role']} turn; "
                            f"both must hold the same prompt before their replies")
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are the same reply; a pair must differ")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in reply):
            raise UserError(f"{where}: {name} has no assistant turn: there is no reply to prefer")
    return prompt, chosen, rejected


def read_pairs(path):
    """Every preference pair of a .jsonl file, checked."""
    pairs = [check_pair(record, where) for record, where in jsonl_records(path)]
    if not pairs:
        raise UserError(f"{path} holds no preference pairs")
    return pairs


def encode_pair(prompt, chosen, rejected, tokenizer):
    """[(ids, targets)] of prompt + chosen and prompt + rejected: the targets are the replies'."""
    return [encode(prompt + reply, tokenizer, first_reply=len(prompt)) for reply in (chosen, rejected)]


def load_pairs(path, tokenizer):
    """(ids, targets, bounds) of a .jsonl file of pairs (read and encoded now) or of a folder
    tools.prepare made of one: sequence 2i is pair i's prompt + chosen reply, 2i + 1 its
    prompt + rejected reply."""
    if os.path.isdir(path):
        data = load_conversations(path, tokenizer)
        if (len(data[2]) - 1) % 2:
            raise UserError(f"{path} holds an odd number of sequences, not pairs; rebuild it with "
                            f"`python -m tools.prepare SOURCE --out {path}`")
        return data
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found; pass --data PATH to a .jsonl of preference pairs")
    ids, targets, bounds = lay_out([e for pair in read_pairs(path) for e in encode_pair(*pair, tokenizer)])
    require_replies(targets.any(), path)
    return ids, targets, bounds


def reply_logps(model, x, y):
    """(R,) each row's log-probability of its reply: the sum of log p(y[t] | x[:t + 1]) over
    the targets (y = -1 elsewhere). x, y: (R, T). The logits come from smol.py's forward,
    (R, T, V), taken in fp32 as the training loss takes them."""
    logits = model(x)[0].float()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")  # (R * T,)
    return -nll.view(y.shape).sum(1)


def dpo_loss(logps, ref_logps, beta):
    """(the mean loss over the pairs, the chosen replies' rewards (P,), the rejected ones' (P,)).
    logps, ref_logps: (2P,), the P chosen rows first, then the P rejected, as PairSampler lays
    out a batch."""
    chosen, rejected = (beta * (logps - ref_logps)).chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


def pair_metrics(logps, ref_logps, beta, prefix=""):
    """What TRL logs of pairs (logps, ref_logps: (2P,) as dpo_loss takes them), under its
    names, and "preference": the share of pairs whose chosen reply the model itself finds
    likelier (log pi(chosen) > log pi(rejected)), the figure that speaks before training, when
    every reward is 0."""
    loss, chosen, rejected = dpo_loss(logps, ref_logps, beta)
    logps_chosen, logps_rejected = logps.chunk(2)
    return {f"{prefix}loss": loss.item(),
            f"{prefix}rewards/chosen": chosen.mean().item(), f"{prefix}rewards/rejected": rejected.mean().item(),
            f"{prefix}rewards/margins": (chosen - rejected).mean().item(),
            f"{prefix}rewards/accuracies": (chosen > rejected).float().mean().item(),
            f"{prefix}logps/chosen": logps_chosen.mean().item(),
            f"{prefix}logps/rejected": logps_rejected.mean().item(),
            f"{prefix}preference": (logps_chosen > logps_rejected).float().mean().item()}


class DPO:
    """The loss train.py's step minimises on pairs, and what its evaluations measure.
    A batch's y is (targets (2P, T), the reference's log-probabilities (2P,))."""

    def __init__(self, beta):
        self.beta = beta

    def __call__(self, model, x, y):
        targets, ref_logps = y
        return dpo_loss(reply_logps(model, x, targets), ref_logps, self.beta)[0]

    def before(self, sampler, eval_iters):
        """The evaluation of step 0, from the reference's log-probabilities alone (the model is
        the reference then: every reward is 0, every pair's loss log 2)."""
        scored = {}
        for split in ("train", "val"):
            pairs = [i for *_, i in sampler.eval_pairs(split, eval_iters)]
            ref_logps = sampler.reference[pairs].T.flatten()  # (2P,): the chosen replies', then the rejected
            scored[split] = ([ref_logps], [ref_logps])
        return self.summary(scored)

    @torch.no_grad()
    def evaluate(self, model, sampler, eval_iters, ctx):
        """On the evaluation pairs of each split (sampler.eval_batches): {"train": its DPO loss,
        "val": ..., and pair_metrics of both, TRL's eval_ prefix on the validation pairs'}."""
        model.eval()
        scored = {}
        for split in ("train", "val"):
            logps, refs = [], []
            for x, (targets, ref_logps) in sampler.eval_batches(split, eval_iters):
                with ctx:
                    logps.append(reply_logps(model, x, targets).cpu())
                refs.append(ref_logps.cpu())
            scored[split] = (logps, refs)
        model.train()
        return self.summary(scored)

    def summary(self, scored):
        """scored: {split: ([logps (2P,) of each batch], [ref_logps (2P,) of each batch])}."""
        out = {}
        for split, (logps, refs) in scored.items():
            prefix = "" if split == "train" else "eval_"
            metrics = pair_metrics(chosen_first(logps), chosen_first(refs), self.beta, prefix)
            out[split] = metrics.pop(f"{prefix}loss")
            out.update(metrics)
        return out


def chosen_first(batches):
    """[(2P_i,)] each [chosen..., rejected...] -> (2P,): every batch's chosen rows, then every
    batch's rejected rows, as dpo_loss takes them."""
    halves = [t.chunk(2) for t in batches]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
