"""StableLM-Tuned-Alpha chat semantics: prompt format, stop tokens and sampling — defined once, used by all."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from quantkit.errors import QuantkitError

SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = "<|SYSTEM|>", "<|USER|>", "<|ASSISTANT|>"

# The model card's system prompt, verbatim: five lines, each ending in a line break.
STABLELM_SYSTEM_PROMPT = (
    "# StableLM Tuned (Alpha version)\n"
    "- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.\n"
    "- StableLM is excited to be able to help the user, but will refuse to do anything that could be "
    "considered harmful to the user.\n"
    "- StableLM is more than just an information source, StableLM is also able to write poetry, "
    "short stories, and make jokes.\n"
    "- StableLM will refuse to participate in anything that could harm a human.\n"
)

# The card's StopOnTokens ids are 50278, 50279, 50277, 1, 0: these token texts in the real tokenizer.
STOP_TOKEN_TEXTS = (USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, "<|padding|>", "<|endoftext|>")

# The card's sampling defaults.
CARD_TEMPERATURE = 0.7
CARD_MAX_NEW_TOKENS = 64


def render_prompt(
    user: str,
    system: str = STABLELM_SYSTEM_PROMPT,
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """`<|SYSTEM|>{system}<|USER|>{u1}<|ASSISTANT|>{a1}...<|USER|>{user}<|ASSISTANT|>`.

    `history` holds earlier (user, assistant) turns, oldest first.
    """
    turns = "".join(f"{USER_TOKEN}{u}{ASSISTANT_TOKEN}{a}" for u, a in history)
    return f"{SYSTEM_TOKEN}{system}{turns}{USER_TOKEN}{user}{ASSISTANT_TOKEN}"


def fit_history(
    tokenizer, user: str, history: Sequence[tuple[str, str]], max_positions: int, max_new_tokens: int,
    system: str = STABLELM_SYSTEM_PROMPT,
) -> tuple[list[int], int]:
    """Token ids of the prompt for `user` after the most recent whole turns of `history` that leave
    `max_new_tokens` of the model's `max_positions`, and how many of the oldest turns were dropped. The system
    prompt is always kept; a message that does not fit even alone is a QuantkitError."""
    budget = max_positions - max_new_tokens
    for dropped in range(len(history) + 1):
        ids = tokenizer(render_prompt(user, system, history[dropped:]))["input_ids"]
        if len(ids) <= budget:
            return ids, dropped
    raise QuantkitError(f"message too long: with the system prompt it takes {len(ids)} tokens, and with "
                        f"max_new_tokens {max_new_tokens} the model's {max_positions} positions leave {budget}")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of the stop tokens, looked up by text, in the card's order; absent texts are skipped."""
    vocab = tokenizer.get_vocab()
    return [vocab[text] for text in STOP_TOKEN_TEXTS if text in vocab]


@dataclass
class Sampler:
    """Greedy when temperature == 0; else temperature, top-k and top-p sampling from a seeded generator.

    `vocab_limit` masks logit rows at and past it (the padding rows beyond the tokenizer).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    vocab_limit: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token id per row from fp32 logits [B, V]."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_limit :] = float("-inf")
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass.
            drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)


def render_dialogue(tokenizer, turns: Sequence[tuple[str, str]], system: str = STABLELM_SYSTEM_PROMPT,
                    ) -> tuple[list[int], list[bool]]:
    """Token ids of a whole dialogue in the prompt format, and which ids are assistant text (scored/learned).

    Each piece is tokenized on its own; the chat tokens are special, so this equals tokenizing the full text.
    """
    role_token = {"user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}
    ids = tokenizer.convert_tokens_to_ids([SYSTEM_TOKEN]) + tokenizer(system)["input_ids"]
    scored = [False] * len(ids)
    for role, text in turns:
        piece = tokenizer(text)["input_ids"]
        ids += tokenizer.convert_tokens_to_ids([role_token[role]]) + piece
        scored += [False] + [role == "assistant"] * len(piece)
    return ids, scored


def chat_template() -> str:
    """The prompt format as a Hugging Face `chat_template` (Jinja), for `apply_chat_template` and chat servers.

    It renders exactly what `render_prompt` renders: a leading "system" message replaces the card's system prompt,
    then user / assistant messages in order, and `<|ASSISTANT|>` as the generation prompt.
    """
    tag = {"user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
        f"{{% else %}}{{% set system = {json.dumps(STABLELM_SYSTEM_PROMPT)} %}}{{% endif %}}"
        f"{SYSTEM_TOKEN}{{{{ system }}}}"
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{tag['user']}"
        f"{{% elif message['role'] == 'assistant' %}}{tag['assistant']}"
        "{% else %}{{ raise_exception('roles must be system (first), user or assistant') }}{% endif %}"
        "{{ message['content'] }}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{ASSISTANT_TOKEN}{{% endif %}}"
    )
