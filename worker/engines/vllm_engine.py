"""vLLM engine: LLMEngine add_request/step, continuously batched, interactive first.

Written against vLLM 0.20-0.26 (V1 LLMEngine). Imported only when SLUICE_ENGINE=vllm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast, get_args

from vllm import EngineArgs, LLMEngine, RequestOutput, SamplingParams, TokensPrompt
from vllm.config.cache import CacheDType
from vllm.config.model import ModelDType
from vllm.sampling_params import RequestOutputKind

from sluice.config import Settings
from sluice.errors import ConfigError
from worker.engines.base import Engine, GenRequest, GenResult, Sampling

if TYPE_CHECKING:
    from vllm.entrypoints.chat_utils import ChatCompletionMessageParam


def engine_args(settings: Settings) -> EngineArgs:
    """vLLM's EngineArgs from Sluice settings (every engine knob passes through)."""
    if settings.dtype not in get_args(ModelDType):
        raise ConfigError(f"SLUICE_DTYPE: {settings.dtype!r} is not one of {get_args(ModelDType)}")
    if settings.kv_cache_dtype not in get_args(CacheDType):
        raise ConfigError(
            f"SLUICE_KV_CACHE_DTYPE: {settings.kv_cache_dtype!r} is not one of "
            f"{get_args(CacheDType)}"
        )
    return EngineArgs(
        model=settings.model,
        served_model_name=settings.served_model,
        quantization=settings.quantization or None,
        dtype=cast("ModelDType", settings.dtype),
        seed=settings.seed,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        kv_cache_dtype=cast("CacheDType", settings.kv_cache_dtype),
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager,
        load_format=settings.load_format,
        # Lower priority values are scheduled first: interactive (0) before bulk (1).
        scheduling_policy="priority",
        disable_log_stats=True,
    )


def sampling_params(s: Sampling) -> SamplingParams:
    """vLLM SamplingParams for Sluice sampling; only finished outputs are returned."""
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        stop=list(s.stop) or None,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        ignore_eos=s.ignore_eos,
        # FINAL_ONLY: step() then skips building a RequestOutput per running request.
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


class VLLMEngine(Engine):
    """vLLM's LLMEngine fed request by request; step() is one scheduler iteration."""

    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        self._engine = LLMEngine.from_engine_args(engine_args(settings))
        self._tokenizer = self._engine.get_tokenizer()
        bos_id = self._tokenizer.bos_token_id  # None for models without a BOS token
        self._bos = "" if bos_id is None else self._tokenizer.decode([bos_id])
        self._max_model_len = int(self._engine.model_config.max_model_len)
        self._slots = settings.max_num_seqs
        self._live: dict[str, tuple[int, int]] = {}  # vLLM request id -> (our id, prompt tokens)
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The model's chat template, with the generation prompt."""
        rendered = self._tokenizer.apply_chat_template(
            cast("list[ChatCompletionMessageParam]", messages),
            tokenize=False,
            add_generation_prompt=True,
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template returned {type(rendered).__name__}, not text")
        return rendered

    def _encode(self, text: str) -> list[int]:
        # A rendered chat prompt already starts with BOS; adding another would skew the model.
        add_special = not (self._bos and text.startswith(self._bos))
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special)
        return ids

    def count_tokens(self, text: str) -> int:
        """Prompt tokens as vLLM will see them."""
        return len(self._encode(text))

    def busy_slots(self) -> int:
        """Requests vLLM holds, capped at its slots (the rest wait in its queue)."""
        return min(len(self._live), self._slots)

    def add(self, request: GenRequest) -> None:
        """Hand the request to vLLM's scheduler; a rejected request fails alone."""
        ids = request.prompt_token_ids
        if ids is None:
            ids = self._encode(request.prompt)
        # Token ids go in directly, so vLLM does not tokenize the prompt a second time.
        prompt = TokensPrompt(prompt_token_ids=ids, prompt=request.prompt)
        request_id = str(request.id)
        try:
            self._engine.add_request(
                request_id, prompt, sampling_params(request.sampling), priority=request.priority
            )
        except (ValueError, TypeError) as exc:  # vLLM's verdict on length or parameters
            self._done.append(GenResult(request.id, "", "error", len(ids), 0, str(exc)))
            return
        self._live[request_id] = (request.id, len(ids))

    def abort(self, ids: list[int]) -> None:
        """Abort in vLLM; each comes back from the next step with finish_reason 'abort'."""
        found = [str(i) for i in ids if str(i) in self._live]
        if not found:
            return
        # The ids are the ones given to add_request (vLLM maps them to its internal ids).
        self._engine.abort_request(found)
        for request_id in found:
            our_id, prompt_tokens = self._live.pop(request_id)
            self._done.append(GenResult(our_id, "", "abort", prompt_tokens))

    def has_unfinished(self) -> bool:
        """True while vLLM holds a request or results await return."""
        return bool(self._live) or bool(self._done)

    def step(self) -> list[GenResult]:
        """One vLLM iteration; returns the requests that finished in it."""
        results, self._done = self._done, []
        # Nothing live: skip vLLM's step, which may block waiting for engine-core output.
        if not self._live:
            return results
        for output in self._engine.step():
            if not isinstance(output, RequestOutput) or not output.finished:
                continue
            found = self._live.pop(output.request_id, None)
            if found is None:  # aborted after vLLM produced it
                continue
            our_id, prompt_tokens = found
            results.append(self._result(our_id, prompt_tokens, output))
        return results

    @staticmethod
    def _result(our_id: int, prompt_tokens: int, output: RequestOutput) -> GenResult:
        if output.prompt_token_ids is not None:
            prompt_tokens = len(output.prompt_token_ids)
        if not output.outputs:
            return GenResult(our_id, "", "error", prompt_tokens, 0, "vLLM returned no output")
        first = output.outputs[0]  # n is always 1: the API rejects n > 1
        finish = first.finish_reason or "stop"
        return GenResult(our_id, first.text, finish, prompt_tokens, len(first.token_ids))

    def close(self) -> None:
        """Stop vLLM's engine core (its process and GPU memory)."""
        self._engine.engine_core.shutdown()
