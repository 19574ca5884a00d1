"""Batched sampling for GRPO: every prompt's G completions at once, with the very model being trained.

- Shared weights: the sampler runs the model the optimizer updates (the peft model with its adapter active,
  ftcli's kernels, NF4 or 16-bit weights), in eval mode under no_grad, and puts every module's mode back after.
  No second copy of the weights exists, which is most of GRPO's memory saving over a separate inference engine.
- Left padding: prompts are padded on the left to the batch's longest, so every row's next token goes into the same
  cache column and one forward serves the whole batch. Positions count each row's real tokens only and the
  attention mask hides the padding, so a row's tokens are those it would get alone.
- Static cache: a transformers StaticCache of rows x (longest prompt + max_new_tokens) gives every tensor of the
  one-token step a fixed shape and address. It is made per call and dropped, with the graph and the buffers, before
  the call returns, so the loss that follows gets the memory back.
- CUDA graph: at one token per row the step is bound by kernel launches, not by the GPU's work, so on CUDA the
  decode forward is captured once per call and replayed per token. Its inputs (token, positions, a prebuilt 4-D
  additive mask, which transformers passes through untouched) are static buffers updated in place, and the cache
  advances its position in a device tensor, so nothing in the step waits for the host. Sampling, outside the
  graph, draws from the caller's generator. On the CPU the same buffers feed an eager forward, so tests exercise
  what the GPU replays. The prefill runs eagerly.
- Models with sliding-window layers (Gemma 2 and 3, Mistral v0.1) decode eagerly with a 2-D padding mask:
  transformers' sliding-window cache layers count tokens in Python and size their window from that mask. So do
  models whose RoPE scaling reads the largest position on the host every forward (dynamic NTK, LongRoPE).

`GenerationEngine` is the interface the GRPO loop calls, so another engine (vLLM) could stand in for this one.
"""

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ftcli.decoding import Sampling, cache_argument_name, has_sliding_window_layers, next_token_logits, pick_tokens

FINISHED_CHECK_EVERY = 8  # tokens between looks at whether every row has stopped; each look waits for the GPU


@dataclass
class Completions:
    ids: list[list[int]]  # each completion's token ids, its stop token included when it stopped at one
    finished: list[bool]  # True when it stopped at a stop id, False when cut at max_new_tokens


class GenerationEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator) -> Completions: ...


class BatchedSampler:
    """Completions for a batch of prompts (GRPO passes each prompt G times) from `model` as it is right now."""

    def __init__(self, model, stop_ids: set[int], pad_id: int, max_prompt_length: int):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.max_prompt_length = max_prompt_length
        self.device = next(model.parameters()).device
        self.cache_argument = cache_argument_name(model)
        self.sliding = has_sliding_window_layers(model.config)
        self.graphed = self.device.type == "cuda" and not self.sliding and not rope_reads_positions_on_the_host(model)
        # one warm-up stream for every call: cuBLAS keeps a workspace per stream, so a new stream a call would leave
        # a new workspace behind each time
        self.warm_up_stream = torch.cuda.Stream(self.device) if self.graphed else None

    def generate(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator) -> Completions:
        """Sample up to `sampling.max_new_tokens` tokens per prompt; `generator` (on the model's device, seeded by
        the caller) makes the draw repeatable. Temperature 0 is greedy."""
        self._check(prompts, sampling)
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                tokens, steps = self._sample(prompts, sampling, generator)
        finally:
            for module, training in modes.items():
                module.training = training
        return self._completions(tokens.tolist(), steps)

    def _check(self, prompts: list[list[int]], sampling: Sampling) -> None:
        """The recipe and the GRPO data stage rule these out (prompts cut to max_prompt_length, empty ones dropped,
        at least one new token), so a failure here is a bug in the caller."""
        if not prompts or sampling.max_new_tokens < 1:
            raise ValueError(f"the sampler needs prompts and max_new_tokens >= 1, got {len(prompts)} prompts and "
                             f"max_new_tokens={sampling.max_new_tokens}")
        for row, prompt in enumerate(prompts):
            if not 1 <= len(prompt) <= self.max_prompt_length:
                raise ValueError(f"prompt {row} has {len(prompt)} tokens; the sampler takes 1 to "
                                 f"{self.max_prompt_length} (grpo.max_prompt_length)")

    def _sample(self, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator):
        """The rows' new tokens, (rows, max_new_tokens) on the device with padding after each row's stop, and how
        many steps ran. Everything the decoding allocates (cache, buffers, graph) is local to this call."""
        from transformers import StaticCache

        batch = LeftPadded(prompts, self.pad_id, self.device)
        width = batch.ids.shape[1] + sampling.max_new_tokens
        cache = StaticCache(config=self.model.config, max_cache_len=width)
        inputs = DecodeInputs(batch, width, None if self.sliding else self._mask_dtype())
        logits = next_token_logits(self.model, self.cache_argument, cache, batch.ids, batch.positions,
                                   inputs.prefill_mask(batch))
        step = self._decode_step(cache, inputs)
        stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=self.device)
        tokens = torch.full((len(prompts), sampling.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for index in range(sampling.max_new_tokens):
            token = pick_tokens(logits, sampling, generator).masked_fill(finished, self.pad_id)
            tokens[:, index] = token
            finished |= torch.isin(token, stops)
            done = index + 1 == sampling.max_new_tokens
            if done or ((index + 1) % FINISHED_CHECK_EVERY == 0 and bool(finished.all())):
                return tokens, index + 1
            inputs.advance(token, index)
            logits = step()

    def _decode_step(self, cache, inputs: "DecodeInputs") -> Callable[[], torch.Tensor]:
        """The one-token forward over `inputs`' buffers: eager, or on CUDA a graph captured on first use."""
        def forward() -> torch.Tensor:
            return next_token_logits(self.model, self.cache_argument, cache, inputs.token, inputs.positions,
                                     inputs.attention_mask())

        return CapturedStep(forward, self.warm_up_stream) if self.graphed else forward

    def _mask_dtype(self) -> torch.dtype:
        """The dtype of the model's hidden states, which an additive mask must match."""
        return self.model.get_input_embeddings().weight.dtype

    def _completions(self, tokens: list[list[int]], steps: int) -> Completions:
        """Each row's tokens up to and including its first stop id, or all `steps` of them."""
        ids, finished = [], []
        for row in tokens:
            stop = next((i for i, token in enumerate(row[:steps]) if token in self.stop_ids), None)
            ids.append(row[:steps] if stop is None else row[:stop + 1])
            finished.append(stop is not None)
        return Completions(ids, finished)


class LeftPadded:
    """Prompts padded on the left to the longest: ids, which columns are real, and each token's position counted
    over its row's real tokens (padding gets position 0)."""

    def __init__(self, prompts: list[list[int]], pad_id: int, device: torch.device):
        longest = max(len(prompt) for prompt in prompts)
        self.ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        columns = torch.arange(longest, device=device)
        padding = longest - self.lengths[:, None]
        self.real = columns >= padding
        self.positions = (columns - padding).clamp(min=0)


class DecodeInputs:
    """The one-token step's inputs as buffers updated in place, so a captured graph finds them at the same
    addresses every step: the fed token, each row's position, and which cache columns each row attends to.

    With `mask_dtype` the mask is 4-D and additive (rows, 1, 1, width): transformers passes a 4-D mask to the
    attention as it is, with no mask building (and no host sync) inside the step. Without, it is the 2-D padding
    mask over the columns filled so far, from which transformers builds each layer's mask (sliding windows too)."""

    def __init__(self, batch: LeftPadded, width: int, mask_dtype: torch.dtype | None):
        rows, self.prompt_length = batch.ids.shape
        self.column = self.prompt_length - 1  # the last cache column filled
        self.token = batch.ids.new_zeros(rows, 1)
        self.first_positions = batch.lengths[:, None]  # the first new token's position: its row's real length
        self.positions = self.first_positions.clone()
        self.seen = torch.zeros(rows, width, dtype=torch.bool, device=batch.ids.device)
        self.seen[:, :self.prompt_length] = batch.real
        self.mask_dtype = mask_dtype
        self.mask = None if mask_dtype is None else additive_mask(self.seen[:, None, None, :], mask_dtype)

    def advance(self, token: torch.Tensor, index: int) -> None:
        """Feed `token` (one per row) as the `index`-th new token, into the next cache column."""
        self.column = self.prompt_length + index
        self.token.copy_(token[:, None])
        torch.add(self.first_positions, index, out=self.positions)
        self.seen[:, self.column] = True
        if self.mask is not None:
            self.mask[:, :, :, self.column] = 0.0

    def attention_mask(self) -> torch.Tensor:
        return self.mask if self.mask is not None else self.seen[:, :self.column + 1]

    def prefill_mask(self, batch: LeftPadded) -> torch.Tensor:
        """The prompts' mask: causal over real columns; a padding query sees itself too (it must see something,
        and its output is never read), so no attention row is empty."""
        if self.mask_dtype is None:
            return batch.real
        queries = torch.arange(self.prompt_length, device=batch.ids.device)[:, None]
        keys = torch.arange(self.seen.shape[1], device=batch.ids.device)[None, :]
        allowed = (self.seen[:, None, :] & (keys <= queries)) | (keys == queries)
        return additive_mask(allowed[:, None], self.mask_dtype)


def rope_reads_positions_on_the_host(model) -> bool:
    """Dynamic NTK and LongRoPE scaling choose their frequencies from the largest position at every forward, in
    Python: a host sync that a CUDA graph cannot capture."""
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        if any(isinstance(kind, str) and ("dynamic" in kind or kind == "longrope") for kind in kinds):
            return True
    return False


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest value where not, as transformers' own masks are."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class CapturedStep:
    """A forward over static buffers, run eagerly once on a side stream (that run does the first step's real
    work, and lets cuBLAS, Triton and the allocator set up outside the capture), then captured as a CUDA graph and
    replayed for every later step. Its output lives in the graph's memory: read it before the next replay."""

    def __init__(self, forward: Callable[[], torch.Tensor], side: torch.cuda.Stream):
        self.forward, self.side = forward, side
        self.graph = None
        self.output = None

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self._warm_up_and_capture()
        self.graph.replay()
        return self.output

    def _warm_up_and_capture(self) -> torch.Tensor:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            logits = self.forward()
        torch.cuda.current_stream().wait_stream(self.side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.forward()
        return logits
