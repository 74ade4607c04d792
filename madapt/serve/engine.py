"""Batched token generation over a `MultiLora` base: one row per request, each with its own adapter,
sampling settings, token budget and stop strings.

Two ways to run rows, sharing the per-row parts (sampling, which is `madapt.serve.sampling`, stop strings,
incremental detokenization):

* `Engine.generate(rows)`: the static batch. Rows are left-padded into one batch and decoded together
  with a KV cache until the last one ends (`scheduler: static`).
* `DecodeBatch`: the running batch of iteration-level (continuous) batching. `admit(rows)` prefills new
  rows and joins them to the running batch; `step()` is one decode step for every running row; finished,
  failed and cancelled rows leave after each step and free their place. `madapt.serve.scheduler` drives it.

Each row stops on EOS, a stop string or its own `max_tokens`. Text is detokenized incrementally (only the
new tokens, decoded in a small window of the previous ones, as vLLM's detokenizer does) and handed out as
it grows, held back while it could still turn into a stop string, so the HTTP layer can stream it; the
text is the same as decoding all the tokens at once. A failure while choosing or handing out one row's
token (a sampling error, a callback that raises) ends that row with an error; the other rows go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from madapt.compat.torch import has_forward_pre_hook
from madapt.serve import decode_step, native, sampling
from madapt.serve.constrain import RowGrammar, mask_rows
from madapt.serve.cpu_gemm import use_onednn
from madapt.serve.decode_attention import use_decode_attention
from madapt.serve.kv_cache import growing_cache
from madapt.serve.multilora import MultiLora, RowAdapters, active_view, swap_remove
from madapt.serve.native_layers import use_native_layers
from madapt.serve.openai.protocol import GREEDY_TEMPERATURE
from madapt.serve.sampling import LogitsProcessor, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One request's generation: inputs, settings and (filled in) results."""

    prompt_ids: list[int]
    slot: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[Row], None] | None = None
    """Called once when the row has left its batch (finished, failed or cancelled)."""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    """'stop', 'length', 'error' (see `error`) or 'cancelled'."""
    error: str | None = None
    first_token_s: float | None = None
    cancelled: bool = False
    """Set from any thread (the client went away): the row leaves its batch at the next step."""
    steps: int = 0
    """Forward passes (prefill and decode steps) that computed a token for this row."""
    prefix_offset: int = 0  # incremental detokenization: ids[prefix_offset:read_offset] is the window
    read_offset: int = 0
    generator: torch.Generator | None = None
    top_k: int = 0
    """0 or -1: off."""
    min_p: float = 0.0
    processors: list[LogitsProcessor] = field(default_factory=list)
    """Applied in order to the row's logits before it picks a token (`madapt.serve.sampling`)."""
    logprobs: int | None = None
    """Record each generated token's logprob with this many alternatives (None: none)."""
    prompt_logprobs: bool = False
    """Record the prompt tokens' logprobs too (with `logprobs or 0` alternatives)."""
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token in `ids`."""
    prompt_token_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    started_s: float | None = None
    """When the row's prefill started (`time.perf_counter`): its time in the queue ends there."""
    grammar: RowGrammar | None = None
    """Structured output (`madapt.serve.constrain`): masks the row's logits, ends it once complete."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class StepOptions:
    """How a forward runs on CPU; each is exact and on by default (docs/serving.md: what each bought)."""

    onednn: bool = True
    """The base's fp32 CPU Linears on oneDNN (`madapt.serve.cpu_gemm`), else torch's default, MKL."""
    prepack: bool = True
    """oneDNN on copies of the weights packed once (a second copy of the base's Linears in memory)."""
    decode_attention: bool = True
    """A decode step's attention in madapt's own code (`madapt.serve.decode_attention`), else SDPA's kernel."""
    native_kernels: bool = True
    """madapt's C++ CPU kernels (`madapt.serve.native`) for a decode step's attention and adapter products, the
    base's RMSNorm, gated-MLP activation and rotary embedding, and the greedy argmax, where they build; else
    torch's ops."""
    flat_decode: bool = True
    """With the kernels: a Llama model's decode step as one loop over its layers calling them directly
    (`madapt.serve.decode_step`), else through the model's forward."""


class Engine:
    """Decodes rows over `lora`'s base, its forwards run as `step` says."""

    def __init__(
        self,
        lora: MultiLora,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_length: int,
        step: StepOptions = StepOptions(),
    ):
        self.lora = lora
        self.model = lora.model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos = {t for t in [tokenizer.eos_token_id] if t is not None}
        head = self.model.get_output_embeddings()
        if head is not None and not has_forward_pre_hook(head, _contiguous_input):  # once per model
            head.register_forward_pre_hook(_contiguous_input)
        routed = use_onednn(self.model, step.onednn, prepack=step.prepack)
        kernel = ("oneDNN, prepacked" if step.prepack else "oneDNN") if step.onednn else "F.linear"
        attention = use_decode_attention(self.model, step.decode_attention, kernel=step.native_kernels)
        lora.kernel = step.native_kernels and native.load()
        use_native_layers(self.model, lora.kernel)
        self.flat_decode = step.flat_decode and lora.kernel
        log.info(
            "%d Linears of the base on %s; attention: %s; adapters' products in C++: %s; flat decode step: %s",
            routed,
            kernel,
            attention,
            lora.kernel,
            self.flat_decode,
        )

    @property
    def continuous_ok(self) -> bool:
        """Whether this model's KV cache is plain per-layer tensors that `DecodeBatch` can splice (no
        sliding-window or recurrent layers)."""
        cache = DynamicCache(config=self.model.config)
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)

    @torch.inference_mode()
    def generate(self, rows: list[Row], clock: Callable[[], float] | None = None) -> list[Row]:
        """Decode every row to completion in one batch; `clock` stamps each row's first token."""
        slots = [r.slot for r in rows]
        for row in rows:
            row.started_s = time.perf_counter()
            if row.prompt_logprobs:
                self._score_alone(row)
        self.lora.begin_batch(slots)
        try:
            self._decode(rows, clock)
        finally:
            self.lora.end_batch(slots)
            for row in rows:
                _ended(row)
        return rows

    def _score_alone(self, row: Row) -> None:
        """A row's prompt logprobs from a forward of its own: every position's logits, one row's size."""
        self.lora.begin_batch([row.slot])
        try:
            ids = torch.tensor([row.prompt_ids], device=next(self.model.parameters()).device)
            _score_prompts([row], self.model(input_ids=ids, logits_to_keep=0).logits)
        finally:
            self.lora.end_batch([row.slot])

    def _decode(self, rows: list[Row], clock: Callable[[], float] | None) -> None:
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        cache = growing_cache(self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits, positions = out.logits[:, -1, :].float(), mask.sum(-1)
        for _ in range(max(r.max_tokens for r in rows)):
            tokens = self.choose(rows, logits, clock)
            if all(r.finish_reason is not None for r in rows):
                return
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            logits = self.decode_logits(tokens, positions, mask, cache)
            positions = positions + 1

    def decode_logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """A decode step: the logits `[rows, vocab]` (fp32) after `tokens` (`[rows]`) at `positions`, `mask`
        (`[rows, columns]`) covering the cache and the new column; the flat loop where it covers the step."""
        if self.flat_decode:
            flat = decode_step.decode_logits(self.model, tokens, positions, mask, cache, active_view())
            if flat is not None:
                return flat
        out = self.model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=mask,
            position_ids=positions.unsqueeze(-1),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def choose(self, rows: list[Row], logits: torch.Tensor, clock: Callable[[], float] | None) -> torch.Tensor:
        """Each unfinished row's next token (greedy or its own sampler), advanced into its text. A row that
        fails here ends with `finish_reason='error'`; a cancelled one ends as 'cancelled'. Returns the
        tokens, one per row (finished rows keep the greedy one, unused)."""
        mask_rows(rows, logits)  # rows with a grammar: only the tokens it allows
        tokens = sampling.greedy(logits, kernel=self.lora.kernel).tolist()  # one device sync a step, not one a row
        scored = [i for i, r in enumerate(rows) if r.logprobs is not None and r.finish_reason is None]
        logprobs = dict(zip(scored, torch.log_softmax(logits[scored], dim=-1), strict=True)) if scored else {}
        for i, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            if row.cancelled:
                row.finish_reason = "cancelled"
                continue
            try:
                token = tokens[i] if sampling.plain(row) else sampling.pick(logits[i], row)
                tokens[i] = token
                row.steps += 1
                if row.first_token_s is None:
                    row.first_token_s = (clock or time.perf_counter)()
                if i in logprobs and token not in self.eos:
                    row.token_logprobs.append(sampling.token_logprob(logprobs[i], token, row.logprobs or 0))
                self._advance(row, token)
            except Exception as error:  # this row only: the others go on
                log.warning("a row failed while decoding: %s: %s", type(error).__name__, error)
                row.error = f"generation failed: {type(error).__name__}: {error}"
                row.finish_reason = "error"
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    def _advance(self, row: Row, token: int) -> None:
        if token in self.eos:
            row.finish_reason = "stop"
            new = _detokenize(self.tokenizer, row, final=True)
        else:
            row.ids.append(token)
            complete = row.grammar is not None and row.grammar.advance(token)
            final = complete or len(row.ids) >= row.max_tokens
            new = _detokenize(self.tokenizer, row, final=final)
            if final:
                row.finish_reason = "stop" if complete else "length"
        if new:
            longest = max((len(s) for s in row.stop), default=0)
            start = max(0, len(row.text) - longest + 1)  # earlier text was checked already
            row.text += new
            cut = min((i for i in (row.text.find(s, start) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = row.text[:cut], "stop"
        ready = len(row.text) if row.finish_reason else len(row.text) - _held_back(row.text, row.stop)
        if ready > row.emitted and row.on_text is not None:
            row.on_text(row.text[row.emitted : ready])
        row.emitted = max(row.emitted, ready)


class DecodeBatch:
    """The running batch of continuous batching: rows join (`admit`) and leave between decode steps.

    Layout (see `madapt.serve.scheduler` for why): one left-padded KV cache for all running rows,
    `[rows, heads, width, head_dim]` per layer, with a 0/1 attention mask `[rows, width]`, each row's next
    position and the token it feeds next. A joining group is prefilled on its own (its rows' adapters
    only), then spliced in (the narrower side left-padded to the common width); leaving rows are replaced
    by the last rows (`swap_remove`, for the cache, the mask and the gathered adapters alike), and pad
    columns no remaining row uses are cut off the left. Not thread-safe: one thread drives it.
    """

    def __init__(self, engine: Engine, clock: Callable[[], float] | None = None):
        self.engine = engine
        self.clock = clock
        self.rows: list[Row] = []
        self.adapters = RowAdapters(engine.lora)
        self.cache: DynamicCache | None = None
        self.device = next(engine.model.parameters()).device
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.steps = 0

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` (one forward, their adapters only), take each one's first token and join the
        rows that go on to the running batch. A prefill that fails fails these rows only."""
        rows = [r for r in rows if not self._cancelled_before_start(r)]
        if not rows:
            return
        if len(rows) > 1 and any(r.prompt_logprobs for r in rows):  # every position's logits: one row at a time
            for group in [[r for r in rows if not r.prompt_logprobs], *([r] for r in rows if r.prompt_logprobs)]:
                if group:
                    self.admit(group)
            return
        for row in rows:
            row.started_s = time.perf_counter()
        start = len(self.rows)
        self.adapters.add([r.slot for r in rows])
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.engine.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
        )
        try:
            with self.engine.lora.forward_rows(self.adapters, start, start + len(rows)):
                out = self.engine.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    cache=growing_cache(self.engine.model.config),
                    use_cache=True,
                    logits_to_keep=_keep(rows),
                )
            _score_prompts(rows, out.logits)
        except Exception as error:
            log.exception("prefill of %d rows failed", len(rows))
            self.adapters.remove(list(range(start, start + len(rows))))
            for row in rows:
                row.error, row.finish_reason = f"generation failed: {type(error).__name__}: {error}", "error"
                _ended(row)
            return
        self._splice(out.cache, mask)
        self.rows.extend(rows)
        self.positions = torch.cat([self.positions, mask.sum(-1)])
        tokens = self.engine.choose(rows, out.logits[:, -1, :].float(), self.clock)
        self.tokens = torch.cat([self.tokens, tokens])
        self._evict()

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every running row; rows that end leave afterwards."""
        self._evict()  # rows cancelled since the last step cost nothing more
        if not self.rows:
            return
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=-1)
        try:
            with self.engine.lora.forward_rows(self.adapters, 0, len(self.rows)):
                assert self.cache is not None  # rows run: their cache is there
                logits = self.engine.decode_logits(self.tokens, self.positions, mask, self.cache)
        except Exception as error:  # the batch's own state is unusable: every running row fails
            log.exception("decode step over %d rows failed", len(self.rows))
            for row in self.rows:
                row.error, row.finish_reason = f"generation failed: {type(error).__name__}: {error}", "error"
            self._evict()
            return
        self.steps += 1
        self.mask = mask
        self.positions = self.positions + 1
        self.tokens = self.engine.choose(self.rows, logits, self.clock)
        self._evict()

    def close(self) -> None:
        """Every running row leaves as cancelled (the replica is stopping)."""
        for row in self.rows:
            row.cancelled = True
        self._evict()

    def _cancelled_before_start(self, row: Row) -> bool:
        if row.cancelled:
            row.finish_reason = "cancelled"
            _ended(row)
        return row.cancelled

    def _splice(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join a prefilled group's cache and mask to the running batch's, left-padded to one width."""
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        n, k = len(self.rows), mask.shape[0]
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                joined = a.new_zeros(n + k, a.shape[1], width, a.shape[3])
                joined[:n, :, width - old :] = a
                joined[n:, :, width - new :] = b
                setattr(mine, name, joined)
        joined_mask = self.mask.new_zeros(n + k, width)
        joined_mask[:n, width - old :] = self.mask
        joined_mask[n:, width - new :] = mask
        self.mask = joined_mask

    def _evict(self) -> None:
        """Rows that ended (or were cancelled) leave: the last rows move into their places."""
        for row in self.rows:
            if row.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        holes = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        if not holes:
            return
        gone = [self.rows[i] for i in holes]
        to, moved, live = swap_remove(len(self.rows), holes)
        self.adapters.remove(holes)
        if live == 0:
            self.rows, self.cache = [], None
            self.mask, self.positions, self.tokens = self.mask[:0, :0], self.positions[:0], self.tokens[:0]
        else:
            dst = torch.tensor(to, dtype=torch.long, device=self.device)
            src = torch.tensor(moved, dtype=torch.long, device=self.device)
            tensors = [self.mask, self.positions, self.tokens]
            for t in tensors:
                t[dst] = t[src]
            self.mask, self.positions, self.tokens = (t[:live] for t in tensors)
            for d, s in zip(to, moved, strict=True):
                self.rows[d] = self.rows[s]
            del self.rows[live:]
            used = self.mask.any(0).nonzero()
            cut = int(used[0]) if len(used) else 0  # leading columns that are padding for every row left
            assert self.cache is not None
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    t[dst] = t[src]
                    setattr(layer, name, t[:live, :, cut:])
            self.mask = self.mask[:, cut:]
        for row in gone:
            _ended(row)


def _contiguous_input(module: torch.nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    """The output head's input made contiguous. A prefill keeps the last position's hidden state only
    (`logits_to_keep=1`), a strided slice; with a frozen head weight (a base PEFT has touched, a quantized
    one) torch's matmul cannot fold that slice into one `mm` and runs a `bmm` against the head weight
    expanded per row instead: 5x slower for SmolLM2's 49k-token head, 7% of a batch-32 prefill."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def _ended(row: Row) -> None:
    """Tell the row's owner it is over; an owner that fails to hear it cannot hurt the batch."""
    if row.finish_reason is None:
        row.finish_reason = "cancelled"
    if row.on_end is not None:
        try:
            row.on_end(row)
        except Exception:
            log.exception("a row's end callback failed")


def _detokenize(tokenizer: PreTrainedTokenizerBase, row: Row, *, final: bool) -> str:
    """The text `row.ids` adds since the last call: the tokens from `read_offset` decoded after a window of
    the previous ones (`prefix_offset`), so a token merging with its neighbours (or finishing a multi-byte
    character) comes out right. While the text ends in an incomplete character it waits, unless `final`."""
    prefix = str(tokenizer.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True))
    text = str(tokenizer.decode(row.ids[row.prefix_offset :], skip_special_tokens=True))
    if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
        row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
        return text[len(prefix) :]
    return ""


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string or a whole multi-byte character."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-n:]):
                held = n
                break
    return held


def _keep(rows: list[Row]) -> int:
    """How many positions' logits a prefill keeps: all of them (0) when a row scores its prompt."""
    return 0 if any(r.prompt_logprobs for r in rows) else 1


def _score_prompts(rows: list[Row], logits: torch.Tensor) -> None:
    """The prompt tokens' logprobs of the rows that ask (`logits`: a left-padded prefill's)."""
    width = logits.shape[1]
    for j, row in enumerate(rows):
        if row.prompt_logprobs:
            n = len(row.prompt_ids)
            row.prompt_token_logprobs = sampling.prompt_logprobs(
                logits[j, width - n :], row.prompt_ids, row.logprobs or 0
            )
