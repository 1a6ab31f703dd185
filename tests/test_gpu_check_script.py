"""scripts/gpu-check without a GPU: prompts, the dummy 8B model, settings, table, Sluice half."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sluice.config import load_settings, split_settings
from sluice.sampling import COMPLETIONS, parse_body

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"


def load_script() -> ModuleType:
    """Import scripts/gpu-check (no .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules["gpu_check"] = module
    loader.exec_module(module)
    return module


gc = load_script()


def test_script_is_executable_with_a_python3_shebang() -> None:
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(SCRIPT, os.X_OK)


def test_help_works_when_vllm_cannot_be_imported() -> None:
    # sys.modules[name] = None makes any import of vllm fail, as on a machine without it.
    code = (
        "import runpy, sys; sys.modules['vllm'] = None; sys.argv = ['gpu-check', '--help']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--n", "--max-model-len", "--dummy"):
        assert flag in proc.stdout


def test_main_without_usable_vllm_says_so_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gc, "vllm_problem", lambda: "vLLM is not installed in this Python")
    assert gc.main(["--n", "5"]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_vllm_problem_names_a_wheel_installed_without_its_dependencies() -> None:
    # In child processes: a failed vLLM import leaves half its modules behind.
    probe = subprocess.run(
        [sys.executable, "-c", "import vllm.entrypoints.llm"], capture_output=True, timeout=120
    )
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_gpu_check_script import gc; "
        "print(gc.vllm_problem())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    problem = proc.stdout.strip().splitlines()[-1]
    if probe.returncode == 0:
        assert problem == "None"
    else:
        assert problem.startswith("vLLM is"), problem


def test_prompts_are_reproducible_with_mixed_fixed_lengths() -> None:
    prompts = gc.make_prompts(2000, seed=0)
    assert len(prompts) == 2000
    assert prompts == gc.make_prompts(2000, seed=0)
    assert prompts != gc.make_prompts(2000, seed=1)
    lengths = [p.max_tokens for p in prompts]
    assert min(lengths) >= 16 and max(lengths) <= 512
    # Mixed: short and long outputs both common, many distinct lengths (batch tails).
    assert sum(n <= 48 for n in lengths) > 300
    assert sum(n >= 256 for n in lengths) > 300
    assert len(set(lengths)) > 200
    assert len({p.custom_id for p in prompts}) == 2000
    assert len({p.text for p in prompts}) == 2000


def test_batch_lines_ask_for_fixed_lengths_and_pass_sluices_checks() -> None:
    prompts = gc.make_prompts(50)
    lines = [json.loads(x) for x in gc.batch_lines(prompts, "m")]
    assert [x["custom_id"] for x in lines] == [p.custom_id for p in prompts]
    for line, p in zip(lines, prompts, strict=True):
        assert line["method"] == "POST" and line["url"] == COMPLETIONS
        body = line["body"]
        assert body["ignore_eos"] is True
        assert body["model"] == "m" and body["prompt"] == p.text
        parsed = parse_body(COMPLETIONS, body)
        assert parsed.sampling.max_tokens == p.max_tokens
        assert parsed.sampling.temperature == gc.TEMPERATURE


def test_prompts_file_round_trips(tmp_path: Path) -> None:
    prompts = gc.make_prompts(20)
    gc.write_prompts(prompts, tmp_path / "p.jsonl")
    assert gc.read_prompts(tmp_path / "p.jsonl") == prompts


def test_llama_8b_config_is_the_8b_architecture() -> None:
    c = gc.llama_8b_config(0, [4, 1])
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["num_hidden_layers"]) == (4096, 32)
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (32, 8)
    assert (c["intermediate_size"], c["vocab_size"]) == (14336, 128256)
    assert (c["rope_theta"], c["max_position_embeddings"]) == (500000.0, 131072)
    # Parameter count from the shapes: Llama 3.1 8B has 8.03 billion.
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]
    attn = 2 * h * h + 2 * h * kv
    mlp = 3 * h * c["intermediate_size"]
    params = 2 * c["vocab_size"] * h + c["num_hidden_layers"] * (attn + mlp)
    assert 8.0e9 < params < 8.1e9


def test_dummy_model_dir_has_the_8b_config_and_a_working_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the tiny tokenizer is built with torch installed")
    transformers = pytest.importorskip("transformers")
    out = gc.write_dummy_model(tmp_path / "llama")
    assert not list(out.glob("*.safetensors")), "dummy weights come from vLLM, not files"
    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == 128256 and config.num_hidden_layers == 32
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length >= 4096
    longest = 0
    for p in gc.make_prompts(300):
        ids = tok.encode(p.text)
        assert ids[0] == config.bos_token_id
        assert max(ids) < config.vocab_size
        longest = max(longest, len(ids))
    # Every prompt plus its longest output fits the default --max-model-len.
    assert longest + gc.MAX_OUT <= 4096


def test_model_choice(tmp_path: Path) -> None:
    dummy_dir = tmp_path / "d"
    real = gc.choose_model(False, {}, True, dummy_dir)
    assert (real.model, real.load_format, real.quantization) == (gc.AWQ_MODEL, "auto", "awq_marlin")
    forced = gc.choose_model(True, {"model": "x/y"}, True, dummy_dir)
    assert (forced.model, forced.load_format, forced.dummy) == (str(dummy_dir), "dummy", True)
    assert forced.quantization is None
    assert gc.choose_model(False, {}, False, dummy_dir).dummy
    env = gc.choose_model(False, {"model": "x/y"}, True, dummy_dir)
    # Quantization left to vLLM (the checkpoint says) unless SLUICE_QUANTIZATION was set.
    assert (env.model, env.quantization, env.dummy) == ("x/y", None, False)
    env_q = gc.choose_model(False, {"model": "x/y", "quantization": "gptq"}, False, dummy_dir)
    assert env_q.quantization == "gptq"


def test_both_runs_read_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    choice = gc.choose_model(True, {}, False, tmp_path / "d")
    args = Namespace(n=70_000, max_model_len=2048, max_num_seqs=128, gpu_memory_utilization=0.8)
    overrides = gc.engine_overrides(choice, args, tmp_path / "data")
    shared, own = split_settings(overrides)
    direct = load_settings(**shared)
    env = gc.to_env(overrides)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from_env = load_settings()
    for knob in shared:
        assert getattr(from_env, knob) == getattr(direct, knob), knob
    assert from_env.engine == "vllm"
    assert from_env.max_num_seqs == 128 and from_env.max_model_len == 2048
    assert from_env.max_file_lines == 70_000
    assert from_env.accepted_models == [gc.DUMMY_NAME] == [from_env.served_model]
    # vLLM's own settings reach the worker and the raw run as SLUICE_ variables too; the
    # vLLM engine reads them (VLLMSettings: tests/vllm/test_engine.py reads these back).
    assert own == {"load_format": "dummy", "quantization": None, "gpu_memory_utilization": 0.8}
    assert env["SLUICE_LOAD_FORMAT"] == "dummy" and env["SLUICE_QUANTIZATION"] == ""
    assert env["SLUICE_GPU_MEMORY_UTILIZATION"] == "0.8"


def test_table_and_ratio() -> None:
    raw = gc.Run("raw vLLM", 2000, 300_000, 100.0)
    fast = gc.Run("Sluice", 2000, 300_000, 102.0)
    table = gc.format_table(raw, fast, 300_000)
    lines = table.splitlines()
    header = ["run", "requests", "output", "tokens", "seconds", "requests/s", "tokens/s"]
    assert lines[0].split() == header
    assert lines[2].split() == ["raw", "vLLM", "2000", "300000", "100.00", "20.00", "3000.0"]
    assert lines[3].split() == ["Sluice", "2000", "300000", "102.00", "19.61", "2941.2"]
    assert "0.980" in lines[4] and "target >= 0.95: met" in lines[4]
    assert gc.ratio(raw, fast) == pytest.approx(100 / 102)
    assert "note" not in table

    slow = gc.Run("Sluice", 2000, 290_000, 110.0)
    table = gc.format_table(raw, slow, 300_000)
    assert "NOT met" in table
    assert "Sluice generated 290000 tokens, not the 300000" in table
    assert gc.ratio(raw, None) is None
    assert "Sluice / raw" not in gc.format_table(raw, None, 300_000)


def test_sluice_half_runs_a_batch_through_the_real_stack(tmp_path: Path) -> None:
    # The echo engine stands in for vLLM: same upload, batch, warm-up job and timing code.
    prompts = gc.make_prompts(60)
    overrides: dict[str, Any] = {
        "engine": "echo",
        "model": "sluice-echo",
        "served_models": "sluice-echo",
        "max_model_len": 4096,
        "data_dir": tmp_path / "data",
    }
    run = gc.run_sluice(overrides, prompts, tmp_path, ready_timeout=120, run_timeout=120)
    assert run.requests == 60
    assert run.output_tokens > 0 and run.seconds > 0
    lines = (tmp_path / "batch.jsonl").read_text().splitlines()
    assert len(lines) == 60
