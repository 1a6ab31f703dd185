"""Transformers engine: batched generate() on CPU or GPU (static batches; fine for small work)."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sluice.config import Settings
from sluice.errors import ConfigError
from worker.engines.base import (
    Choice,
    Delta,
    Engine,
    EngineSettings,
    GenRequest,
    GenResult,
    Sampling,
    TokenLogprob,
    needs_choices,
    with_choices,
)
from worker.engines.meter import OccupancyMeter
from worker.engines.text import WaitQueue, apply_stop

_DTYPES = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype | str:
    if device.type == "cpu":
        return torch.float32  # half precision on CPU is slow or unsupported
    if name == "auto":
        return "auto"  # what the checkpoint's config says
    if name not in _DTYPES:
        raise ConfigError(f"SLUICE_DTYPE: {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


class HFTokenizer:
    """A transformers tokenizer as the worker uses it: chat template, then ids with one BOS."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The tokenizer's chat template, with the generation prompt."""
        rendered = self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template returned {type(rendered).__name__}, not text")
        return rendered

    def encode(self, text: str) -> list[int]:
        """Prompt ids; a rendered chat prompt already starts with BOS, so none is added then."""
        bos = self._tok.bos_token
        add_special = not (isinstance(bos, str) and bos and text.startswith(bos))
        ids = self._tok.encode(text, add_special_tokens=add_special)
        return [int(i) for i in ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text (HF serves small models: per-text calls are cheap enough)."""
        return [self.encode(text) for text in texts]


class HFSettings(EngineSettings):
    """Where the model runs and in what precision."""

    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: the checkpoint's; float32 on CPU whatever is set


class HFEngine(Engine):
    """Runs one generate() per step over up to `slots` waiting requests with equal sampling."""

    name = "hf"
    settings_class = HFSettings

    def __init__(self, settings: Settings, options: HFSettings | None = None) -> None:
        own = options or HFSettings.load()
        self.device = _device(own.device)
        # local_files_only: the worker never downloads; models are prepared ahead.
        self.hf_tokenizer = AutoTokenizer.from_pretrained(settings.model, local_files_only=True)
        self._tokenizer = HFTokenizer(self.hf_tokenizer)
        # from_pretrained returns the model in eval mode (no dropout).
        self.model = AutoModelForCausalLM.from_pretrained(
            settings.model, local_files_only=True, dtype=_dtype(own.dtype, self.device)
        )
        # transformers' decorator on to() hides its real signature from mypy.
        self.model.to(self.device)  # type: ignore[arg-type]
        self._eos_ids = self._eos_token_ids()
        pad_id = self.hf_tokenizer.pad_token_id
        self._pad_id: int = self._eos_ids[0] if pad_id is None else int(pad_id)
        model_max = getattr(self.model.config, "max_position_embeddings", None)
        self._max_model_len = min(settings.max_model_len, int(model_max or settings.max_model_len))
        self._slots = settings.max_num_seqs
        self._waiting: WaitQueue[tuple[GenRequest, list[int]]] = WaitQueue()
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step
        self._deltas: list[Delta] = []
        self.meter = OccupancyMeter(self._slots)

    def _eos_token_ids(self) -> list[int]:
        # Chat models end a turn with a token (e.g. <|eot_id|>) that the generation config
        # lists next to the tokenizer's eos; generation stops at any of them.
        ids = self.model.generation_config.eos_token_id
        found = [ids] if isinstance(ids, int) else list(ids or [])
        eos = self.hf_tokenizer.eos_token_id
        if eos is not None and eos not in found:
            found.append(int(eos))
        if not found:
            raise ConfigError(f"model {self.model.name_or_path!r} defines no eos token")
        return [int(i) for i in found]

    @property
    def tokenizer(self) -> HFTokenizer:
        """The model's tokenizer, with its chat template."""
        return self._tokenizer

    def busy_slots(self) -> int:
        """HF runs nothing between steps."""
        return 0

    def add(self, request: GenRequest) -> None:
        """Queue the request (the worker checked that it fits the context)."""
        self.meter.mark_add()
        ids = self.prompt_ids(request)
        self._waiting.push(request.id, request.priority, (request, ids))

    def abort(self, ids: list[int]) -> None:
        """Drop waiting requests (a running generate() cannot be interrupted)."""
        for request_id in ids:
            found = self._waiting.remove(request_id)
            if found is not None:
                self._done.append(GenResult(request_id, "", "abort", len(found[1])))

    def has_unfinished(self) -> bool:
        """True while anything is queued or awaiting return."""
        return bool(self._waiting) or bool(self._done)

    def _take_batch(self) -> list[tuple[GenRequest, list[int]]]:
        # One generate() call takes one set of sampling parameters: the first waiting
        # request's, plus every later one (in admission order) that shares them.
        first = self._waiting.peek()
        if first is None:
            return []
        sampling = first[0].sampling
        batch = [item for item in self._waiting.in_order() if item[0].sampling == sampling][
            : self._slots
        ]
        for request, _ in batch:
            self._waiting.remove(request.id)
        return batch

    def step(self) -> list[GenResult]:
        """Generate for one batch of waiting requests and return them all."""
        results, self._done = self._done, []
        batch = self._take_batch()
        if not batch:
            return results
        start = time.monotonic()
        try:
            results.extend(self._generate(batch))
        except Exception as exc:  # one failed batch must not take the worker down
            message = f"generation failed: {type(exc).__name__}: {exc}"
            results.extend(GenResult(r.id, "", "error", len(ids), 0, message) for r, ids in batch)
        # generate() runs a batch to its end in one call: a streaming request's text arrives
        # as one delta when it finishes (vLLM streams token by token).
        streaming = {r.id for r, _ in batch if r.stream}
        self._deltas += [Delta(r.id, r.text) for r in results if r.id in streaming and r.text]
        tokens = sum(r.completion_tokens for r in results)
        self.meter.record_step(start, time.monotonic(), len(batch), tokens)
        return results

    @torch.inference_mode()
    def _generate(self, batch: list[tuple[GenRequest, list[int]]]) -> list[GenResult]:
        sampling: Sampling = batch[0][0].sampling
        width = max(len(ids) for _, ids in batch)
        # Left padding keeps every prompt's last token in the final column, where
        # generation continues.
        input_ids = torch.tensor(
            [[self._pad_id] * (width - len(ids)) + ids for _, ids in batch], device=self.device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch], device=self.device
        )
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "do_sample": sampling.temperature > 0,
            "eos_token_id": self._eos_ids,
            # Finished rows are filled with the first eos, so the first eos marks the end.
            "pad_token_id": self._eos_ids[0],
        }
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_tokens
        if sampling.temperature > 0:
            # top_k None (not transformers' default 50) when unset: every token, as vLLM.
            kwargs.update(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,
                min_p=sampling.min_p or None,
            )
        if sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        # n sequences per prompt: sampled ones differ; greedy ones would be n copies of one
        # (transformers refuses num_return_sequences without sampling), so copy it instead.
        copies = sampling.n if sampling.temperature > 0 else 1
        if copies > 1:
            kwargs["num_return_sequences"] = copies
        if sampling.stop:
            # Ends a row early once it has produced a stop string (transformers also looks
            # across the prompt boundary, vLLM only in the output; apply_stop cuts the text).
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.hf_tokenizer)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if sampling.logprobs is not None:
            # Raw logits per step (the model's distribution, as vLLM reports by default).
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        steps: list[torch.Tensor] = []
        if sampling.logprobs is not None:
            steps = [torch.log_softmax(x.float(), dim=-1) for x in output.logits]
            output = output.sequences
        new_tokens = output[:, width:].tolist()
        results = []
        # Rows come grouped by prompt: num_return_sequences rows for each.
        for i, (request, ids) in enumerate(batch):
            rows = range(i * copies, (i + 1) * copies)
            choices = [self._choice(new_tokens[r], sampling, steps, r) for r in rows] * (
                sampling.n // copies
            )
            result = GenResult(request.id, prompt_tokens=len(ids))
            if needs_choices(sampling):
                results.append(with_choices(result, choices))
            else:
                first = choices[0]
                result.text, result.finish_reason = first.text, first.finish_reason
                result.completion_tokens = first.completion_tokens
                results.append(result)
        return results

    def _choice(
        self, row: list[int], sampling: Sampling, steps: list[torch.Tensor], r: int
    ) -> Choice:
        end = next((i for i, t in enumerate(row) if t in self._eos_ids), None)
        generated = row if end is None else row[:end]
        decoded = self.hf_tokenizer.decode(generated, skip_special_tokens=True)
        text, cut = apply_stop(str(decoded), sampling.stop)
        hit_limit = end is None and len(row) >= sampling.max_tokens
        finish = "stop" if cut or not hit_limit else "length"
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = self._logprobs(generated, steps, r, sampling.logprobs)
        return Choice(text, finish, len(generated), logprobs)

    def _logprobs(
        self, generated: list[int], steps: list[torch.Tensor], r: int, top: int
    ) -> list[TokenLogprob]:
        """Each generated token's logprob in row r, and the `top` likeliest at its step."""
        out = []
        for t, token_id in enumerate(generated):
            dist = steps[t][r]
            best = torch.topk(dist, top) if top else None
            alternatives = (
                []
                if best is None
                else [
                    (self._piece(int(i)), float(v))
                    for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
                ]
            )
            out.append(TokenLogprob(self._piece(token_id), float(dist[token_id]), alternatives))
        return out

    def _piece(self, token_id: int) -> str:
        return str(self.hf_tokenizer.decode([token_id]))

    def take_deltas(self) -> list[Delta]:
        """Streaming requests finished by the last step, each as one delta."""
        out, self._deltas = self._deltas, []
        return out

    def close(self) -> None:
        """Free the model's memory."""
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
