"""Our decode loop: prefill the prompt, then one token at a time into a static KV cache.

`model.generate` pays Python and kernel-launch overhead for every token, which at batch size 1 costs more
than the GPU's work. Here the cache is a transformers StaticCache (fixed shapes, fixed addresses), so on a
GPU the one-token step is compiled once with `torch.compile(mode="reduce-overhead")` and replayed as a CUDA
graph. The prompt's prefill runs eagerly (its length changes every turn). On the CPU the same loop runs
eagerly, so tests exercise the code the GPU runs.
"""

import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

SMALLEST_CACHE = 256  # tokens; the cache grows by doubling, so a session compiles the step only a few times


@dataclass
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 is greedy: always the most likely token
    top_p: float = 0.9  # sample only from the most likely tokens that together hold this much probability


class Decoder:
    """Generates token ids for one prompt at a time with one model and one static cache.

    `compile` is honoured on CUDA, for models without sliding-window layers (Gemma 2 and 3, Mistral v0.1 have
    them): transformers' sliding-window cache layer counts tokens in a Python int, which would make the compiled
    step recompile at every token, so those models decode eagerly. The cache holds at most `context_length` tokens.
    """

    def __init__(self, model, context_length: int, compile: bool = True, seed: Optional[int] = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.context_length = context_length
        self.compiled = compile and self.device.type == "cuda" and not has_sliding_window_layers(model.config)
        self.cache, self.cache_size = None, 0
        self.cache_argument = cache_argument_name(model)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.step = self._forward
        if self.compiled:
            # dynamic=False: one graph per cache size, every shape fixed, so the replay never recompiles per token
            self.step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)

    def room_for(self, prompt_length: int) -> int:
        """How many new tokens fit after a prompt of this length."""
        return max(self.context_length - prompt_length, 0)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], sampling: Sampling, stop_ids: set[int] = frozenset()) -> Iterator[int]:
        """Yield the answer's token ids as they are chosen; stops before a stop id, at max_new_tokens, or when
        the context is full. Stopping the iteration early (a break, Ctrl-C) leaves the decoder ready for the next
        prompt: every call starts from an emptied cache."""
        new_tokens = min(sampling.max_new_tokens, self.room_for(len(prompt_ids)))
        if new_tokens == 0:
            return
        self._prepare_cache(len(prompt_ids) + new_tokens)
        prompt = torch.tensor([prompt_ids], device=self.device)
        logits = self._forward(prompt, torch.arange(len(prompt_ids), device=self.device)[None])
        for position in range(len(prompt_ids), len(prompt_ids) + new_tokens):
            token = pick_token(logits, sampling, self.generator)
            if token in stop_ids:
                return
            yield token
            if position + 1 == len(prompt_ids) + new_tokens:
                return
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's output buffer may be reused now
            logits = self.step(torch.tensor([[token]], device=self.device),
                               torch.tensor([[position]], device=self.device))

    def _prepare_cache(self, length: int) -> None:
        """An emptied cache that holds `length` tokens: the same one (same addresses, same compiled graph) while it
        is big enough, else one twice as big."""
        from transformers import StaticCache

        if self.cache is not None and self.cache_size >= length:
            self.cache.reset()
            return
        size = SMALLEST_CACHE
        while size < length:
            size *= 2
        self.cache_size = min(size, self.context_length)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.cache_size)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return next_token_logits(self.model, self.cache_argument, self.cache, input_ids, position_ids)


def next_token_logits(model, cache_argument: str, cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next-token logits (float32, rows x vocabulary) after each row of `input_ids`, which `cache` extends.
    use_cache is passed because ftcli's loader turns it off in the config for training."""
    output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                   logits_to_keep=1, **{cache_argument: cache})
    return output.logits[:, -1].float()


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token of a one-row batch of logits."""
    return int(pick_tokens(logits, sampling, generator)[0])


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row of (rows, vocabulary) logits, on their device: greedy at temperature 0; otherwise sampled
    from the temperature-scaled distribution cut to its top-p mass, with `generator` (on the logits' device)."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probabilities = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p >= 1:  # no cut: the sort over the vocabulary would only cost time
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
    ordered, order = probabilities.sort(dim=-1, descending=True)
    outside = ordered.cumsum(-1) - ordered >= sampling.top_p  # the likelier tokens already hold top_p
    outside[:, 0] = False  # the most likely token is always a candidate
    ordered = ordered.masked_fill(outside, 0.0)
    choice = torch.multinomial(ordered, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class TextStream:
    """Token ids in, text out as soon as it is whole: a piece that ends inside a multi-byte character waits
    for the tokens that complete it. Decodes a short window, not the whole answer, at every token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window_start = 0  # the window decodes from here, so spaces and merges at its start come out right
        self.printed_until = 0  # ids before this one have been printed
        self.printed_length = 0  # characters given out so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        printed = self._decode(self.ids[self.window_start:self.printed_until])
        text = self._decode(self.ids[self.window_start:])
        if len(text) <= len(printed) or text.endswith("\ufffd"):
            return ""
        self.window_start, self.printed_until = self.printed_until, len(self.ids)
        self.printed_length += len(text) - len(printed)
        return text[len(printed):]

    def rest(self) -> str:
        """What is still held back when the answer ends (an answer cut inside a character shows it as it is)."""
        return self.text()[self.printed_length:]

    def text(self) -> str:
        return self._decode(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def has_sliding_window_layers(config) -> bool:
    from transformers import StaticCache

    return any(getattr(layer, "is_sliding", False) for layer in StaticCache(config=config, max_cache_len=1).layers)


def cache_argument_name(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`; pass whichever this version takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
