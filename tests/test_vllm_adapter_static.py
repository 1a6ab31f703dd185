"""The vLLM adapter type-checks against the installed vLLM, and the check has teeth.

vLLM cannot run without a GPU, so CI installs its wheel without dependencies and mypy reads
vLLM's own annotations (the package ships py.typed). A renamed or removed vLLM API then fails
here instead of on the first GPU host.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "worker" / "engines" / "vllm_engine.py"
REQUIRE_ENV = "SLUICE_REQUIRE_VLLM_CHECK"
ERROR_RE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<msg>.*)$")


@dataclass(frozen=True)
class Mypy:
    """One mypy run: exit code, output, and its errors as (file name, line, message)."""

    code: int
    output: str
    errors: list[tuple[str, int, str]]


def run_mypy(
    target: Path, cache_dir: Path, mypypath: Path | None = None, timeout: float = 280
) -> Mypy:
    """`mypy --strict` on one file with the project's config, as CI runs it."""
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if mypypath is not None:
        # MYPYPATH is searched before site-packages, so a stub package here shadows vllm.
        env["MYPYPATH"] = str(mypypath)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache_dir),
            "--no-error-summary",
            "--show-error-codes",
            "--no-pretty",
            str(target),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    errors = []
    for raw in output.splitlines():
        m = ERROR_RE.match(raw)
        if m:
            errors.append((Path(m["path"]).name, int(m["line"]), m["msg"]))
    return Mypy(proc.returncode, output, errors)


def line_of(source: str, needle: str) -> int:
    """1-based line number of the only line containing needle."""
    hits = [i for i, line in enumerate(source.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"expected one line with {needle!r} in the adapter, found {hits}"
    return hits[0]


@pytest.fixture(scope="module")
def vllm_version() -> str:
    """The installed vLLM's version; skips (or fails in CI) when there is none."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        reason = (
            "vllm is not installed in this environment, so the adapter cannot be type-checked "
            "against it (install the wheel alone: pip install --no-deps 'vllm==0.26.0' msgspec)"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    # SamplingParams is a msgspec.Struct: without msgspec's annotations mypy sees a class
    # with an Any base and accepts any keyword, so a renamed sampling field would slip by.
    if importlib.util.find_spec("msgspec") is None:
        pytest.fail(
            f"vllm {version} is installed but msgspec is not; mypy cannot see SamplingParams' "
            "fields without it: pip install --no-deps msgspec"
        )
    return version


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for every run here: analysing vLLM, torch and transformers costs ~40 s
    once; later runs recheck only what changed (the mutated copy, or vllm for a stub)."""
    return tmp_path_factory.mktemp("mypy-cache")


def test_adapter_passes_mypy_strict_against_installed_vllm(
    vllm_version: str, mypy_cache: Path
) -> None:
    result = run_mypy(ADAPTER, mypy_cache)
    assert result.code == 0, f"vllm {vllm_version}:\n{result.output}"
    assert not result.errors


@dataclass(frozen=True)
class Mutation:
    """One wrong use of vLLM's API, and where and how mypy must object."""

    old: str
    new: str
    call: str  # the line the wrong call starts on (mypy may report it or the changed line)
    says: str  # a fragment of mypy's message


MUTATIONS = [
    # An EngineArgs field that does not exist (a renamed engine setting).
    Mutation(
        "max_num_seqs=settings.max_num_seqs,",
        "max_num_seqz=settings.max_num_seqs,",
        "return EngineArgs(",
        '"max_num_seqz" for "EngineArgs"',
    ),
    # A SamplingParams field that does not exist (needs msgspec's annotations to be seen).
    Mutation(
        "max_tokens=s.max_tokens,",
        "max_tokenz=s.max_tokens,",
        "return SamplingParams(",
        '"max_tokenz" for "SamplingParams"',
    ),
    # add_request without its required params argument.
    Mutation(
        "request_id, prompt, sampling_params(request.sampling), priority=request.priority",
        "request_id, prompt, priority=request.priority",
        "self._engine.add_request(",
        '"add_request" of "LLMEngine"',
    ),
    # A method LLMEngine does not have.
    Mutation(
        "self._engine.abort_request(found)",
        "self._engine.abort_requests(found)",
        "self._engine.abort_requests(found)",
        '"LLMEngine" has no attribute "abort_requests"',
    ),
    # A TokensPrompt key that does not exist.
    Mutation(
        "TokensPrompt(prompt_token_ids=ids,",
        "TokensPrompt(prompt_ids=ids,",
        "TokensPrompt(prompt_ids=ids,",
        '"prompt_ids"',
    ),
    # An attribute CompletionOutput does not have.
    Mutation(
        "len(first.token_ids)",
        "len(first.tokens)",
        "len(first.tokens)",
        '"CompletionOutput" has no attribute "tokens"',
    ),
]


def test_wrong_vllm_calls_fail_mypy_on_their_lines(
    vllm_version: str, mypy_cache: Path, tmp_path: Path
) -> None:
    source = ADAPTER.read_text()
    mutated = source
    for m in MUTATIONS:
        assert mutated.count(m.old) == 1, f"the adapter changed: update the mutation {m.old!r}"
        mutated = mutated.replace(m.old, m.new)
    copy = tmp_path / "vllm_engine_mutated.py"
    copy.write_text(mutated)

    result = run_mypy(copy, mypy_cache)

    assert result.code != 0, f"mypy accepted wrong vLLM calls (vllm {vllm_version})"
    mine = [(line, msg) for name, line, msg in result.errors if name == copy.name]
    expected: dict[int, Mutation] = {}
    for m in MUTATIONS:
        lines = {line_of(mutated, m.call), line_of(mutated, m.new)}
        hits = [(line, msg) for line, msg in mine if line in lines and m.says in msg]
        assert hits, f"no error naming line {sorted(lines)} with {m.says!r}:\n{result.output}"
        expected.update(dict.fromkeys(lines, m))
    # Nothing else failed: each error comes from a mutation, not from the copy's setup.
    stray = [(line, msg) for line, msg in mine if line not in expected]
    assert not stray, result.output
    assert len(mine) == len(result.errors), result.output


# A stand-in vllm: the names the adapter uses, with LLMEngine.add_request spelled out and
# everything else Any (module and class __getattr__), so only add_request can fail.
STUB_INIT = """\
from typing import Any

def __getattr__(name: str) -> Any: ...

class LLMEngine:
    @classmethod
    def from_engine_args(cls, engine_args: Any, *args: Any, **kwargs: Any) -> LLMEngine: ...
{add_request}
    def __getattr__(self, name: str) -> Any: ...
"""
STUB_ADD_REQUEST = {
    # vLLM's own shape (0.20-0.26): the adapter must pass against this.
    "same": """\
    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: Any,
        arrival_time: float | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        prompt_text: str | None = None,
    ) -> str: ...""",
    # priority renamed: the adapter's priority= keyword no longer exists.
    "renamed": """\
    def add_request(
        self, request_id: str, prompt: Any, params: Any, *, request_priority: int = 0
    ) -> str: ...""",
    # A new required argument the adapter does not pass.
    "required": """\
    def add_request(
        self, request_id: str, prompt: Any, params: Any, arrival_time: float, priority: int = 0
    ) -> str: ...""",
}
STUB_SUBMODULES = [
    "config/__init__.pyi",
    "config/cache.pyi",
    "config/model.pyi",
    "sampling_params.pyi",
    "entrypoints/__init__.pyi",
    "entrypoints/chat_utils.pyi",
]


def write_stub(root: Path, variant: str) -> Path:
    """A fake vllm stub package under root; returns the directory to put on MYPYPATH."""
    pkg = root / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.pyi").write_text(STUB_INIT.format(add_request=STUB_ADD_REQUEST[variant]))
    for sub in STUB_SUBMODULES:
        path = pkg / sub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from typing import Any\n\ndef __getattr__(name: str) -> Any: ...\n")
    (pkg / "py.typed").write_text("")
    return root


def test_adapter_passes_against_a_stub_with_vllms_add_request(
    tmp_path: Path, mypy_cache: Path
) -> None:
    # The control for the next test: the stub itself is complete enough for the adapter.
    stub = write_stub(tmp_path / "stubs", "same")
    result = run_mypy(ADAPTER, mypy_cache, mypypath=stub)
    assert result.code == 0, result.output


@pytest.mark.parametrize(
    ("variant", "says"),
    [
        ("renamed", 'Unexpected keyword argument "priority" for "add_request" of "LLMEngine"'),
        ("required", 'Missing positional argument "arrival_time" in call to "add_request"'),
    ],
)
def test_adapter_fails_against_a_vllm_whose_add_request_changed(
    tmp_path: Path, mypy_cache: Path, variant: str, says: str
) -> None:
    stub = write_stub(tmp_path / "stubs", variant)
    result = run_mypy(ADAPTER, mypy_cache, mypypath=stub)
    assert result.code != 0, f"the adapter passed against a changed add_request:\n{result.output}"
    line = line_of(ADAPTER.read_text(), "self._engine.add_request(")
    assert [(n, ln) for n, ln, msg in result.errors if says in msg] == [(ADAPTER.name, line)], (
        result.output
    )
