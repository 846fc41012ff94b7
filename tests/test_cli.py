"""The ``fx-shard`` command: the README's commands, the demo's output, one-line mistakes, a fast ``--help``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fx_shard import cli, models
from fx_shard.cli import main
from fx_shard.report import FORMATS

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"^\s*(pip install .+)$", (ROOT / "README.md").read_text(), flags=re.M)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert main_job.endswith("fx-shard demo")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


# What a user's shell may hold that would change what a child process does.
_XLA_ENV = ("PJRT_DEVICE", "CPU_NUM_DEVICES", "FX_SHARD_DEVICES", "TF_CPP_MIN_LOG_LEVEL")


def run_cli(tmp: Path, *args: str, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``fx-shard ARGS`` in a child process (or ``code``), which starts its own XLA runtime, with ``env`` added
    and ``tmp`` as its temp dir. A child that exits 0 leaves nothing of fx_shard's there (its HLO dump is
    removed at exit)."""
    env = {**{k: v for k, v in os.environ.items() if k not in _XLA_ENV}, **env, "TMPDIR": str(tmp)}
    tmp.mkdir(exist_ok=True)
    command = ["-c", code, *args] if code else ["-m", "fx_shard.cli", *args]
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        assert sorted(p.name for p in tmp.glob("fx_shard*")) == [], f"fx-shard {args[0]} left files in {tmp}"
    return proc


def test_checked_in_reports_are_current(tmp_path):
    # The reports under docs/reports are made at 8 devices, measured: regenerate them in a child with 8.
    out = tmp_path / "reports"
    proc = run_cli(tmp_path / "tmp", "report", "all", "--devices", "8", "--measure", "--format", "markdown",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checked_in = sorted(p.name for p in (ROOT / "docs" / "reports").glob("*.md"))
    assert checked_in == sorted(p.name for p in out.glob("*.md"))
    stale = [name for name in checked_in if _rounding_aside((ROOT / "docs" / "reports" / name).read_text())
             != _rounding_aside((out / name).read_text())]
    assert not stale, (
        f"docs/reports/{', '.join(stale)} stale; regenerate: "
        "fx-shard report all --devices 8 --measure --format markdown --output-dir docs/reports"
    )


def _rounding_aside(report: str) -> str:
    """The report with the self-check's error value left out: float rounding may differ by CPU and thread count."""
    return re.sub(r"\(error \d\.\de-\d+, tolerance", "(error _, tolerance", report)


# The demo, then a child process of it printing what it sees of TF_CPP_MIN_LOG_LEVEL.
_DEMO_THEN_CHILD = (
    "import subprocess, sys\n"
    "from fx_shard.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "child = \"import os; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\"\n"
    "seen = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip()\n"
    "print(f'child sees TF_CPP_MIN_LOG_LEVEL={seen}')\n"
    "sys.exit(code)\n"
)


@pytest.mark.parametrize(("model", "devices", "log_level"), [("llama", 8, None), ("gpt2", 2, "0")])
def test_demo_agrees_with_unsharded(model, devices, log_level, tmp_path):
    env = {} if log_level is None else {"TF_CPP_MIN_LOG_LEVEL": log_level}
    proc = run_cli(tmp_path, "demo", "--model", model, "--devices", str(devices), code=_DEMO_THEN_CHILD, **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    *lines, child = proc.stdout.splitlines()
    long = [line for line in lines if len(line) > cli.WIDTH]
    assert not long, long
    name = {"llama": "Llama", "gpt2": "GPT2"}[model]
    # A summary first, the verdict and the time taken last.
    assert lines[0] == f"fx_shard demo: {model} (fx_shard.models.{name}, 2 blocks) on {devices} XLA CPU devices"
    assert re.match(r"- result: agrees with the unsharded model: max \|difference\| / max \|output\| = \d\.\de-\d\d "
                    r"\(limit 1e-05\)$", lines[1])
    # 2 blocks: 2 all-reduces each, 1 for the vocabulary-parallel embedding, nothing else.
    assert "- collectives per forward, counted in XLA's partitioned HLO: all-reduce 5 (as predicted)" in lines[:8]
    assert re.match(rf"verdict: {model} on {devices} XLA CPU devices agrees with the unsharded model \(error \d\.\de-\d\d, "
                    r"limit 1e-05\)$", lines[-2])
    assert re.match(r"took \d+\.\d s: imports \d+\.\d s, fx_shard \d+\.\d s, XLA \(start, compile, run\) \d+\.\d s, "
                    r"check \d+\.\d s$", lines[-1])
    layer = "model.layers.0-1.self_attn.q_proj" if model == "llama" else "transformer.h.0-1.attn.c_attn.q"
    out = "\n".join(lines)
    assert re.search(rf"^{re.escape(layer)}\s+2×\s+colwise\s", out, flags=re.M), out
    assert "Graph diff" not in out and "--full prints the whole report" in out
    # XLA's C++ notices silenced unless the user set their level; either way a child sees the user's environment.
    if log_level is None:
        assert proc.stderr == "" and child == "child sees TF_CPP_MIN_LOG_LEVEL=None"
    else:
        assert "GSPMD sharding propagation is going to be deprecated" in proc.stderr
        assert child == f"child sees TF_CPP_MIN_LOG_LEVEL={log_level}"


# The demo, with the attention replacement dropping the causal mask (the kind of rewrite issue 11 measured wrong).
_DEMO_OF_A_BROKEN_REWRITE = (
    "import sys\n"
    "from fx_shard.cli import main\n"
    "from fx_shard.ops import einsum_attention\n"
    "from fx_shard.passes import attention_to_einsum\n"
    "def attention_without_causal_mask(*args, is_causal=False, **kwargs):\n"
    "    return einsum_attention(*args, **kwargs)\n"
    "attention_to_einsum.einsum_attention = attention_without_causal_mask\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_demo_names_where_a_broken_sharding_first_diverges(tmp_path):
    proc = run_cli(tmp_path, "demo", "--devices", "2", code=_DEMO_OF_A_BROKEN_REWRITE)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.split("\n\n")[0].replace("\n  ", " ").splitlines()  # its items unwrapped
    assert re.fullmatch(r"- result: DISAGREES with the unsharded model: max \|difference\| / max \|output\| = "
                        r"\d\.\de-0[1-3] \(limit 1e-05\)", summary[1]), summary
    assert re.fullmatch(r"- first diverging module: model\.layers\.0\.self_attn\.o_proj \(error \d\.\de[+-]\d\d\); the last "
                        r"agreeing module before it: model\.layers\.0\.self_attn\.v_proj \(error \d\.\de-0[6-9]\)", summary[2])
    assert "DISAGREES with the unsharded model" in proc.stdout.splitlines()[-2]


def test_help_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from fx_shard.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_xla', 'tabulate', 'numpy')))\n"
    )
    for args in (["--help"], ["demo", "--help"], ["report", "--help"]):
        proc = run_cli(tmp_path, *args, code=code)
        assert proc.returncode == 0, proc.stderr
        *help_text, imported = proc.stdout.splitlines()
        assert imported == "[]", (args, imported)
        assert "usage: fx-shard" in help_text[0]


def test_every_option_has_help():
    parser = cli._parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for p in (parser, *commands.values()):
        for action in p._actions:
            assert action.help, f"{p.prog} {'/'.join(action.option_strings) or action.dest} has no help"


def test_the_names_the_help_lists_are_fx_shards():
    assert cli.MODELS == models.MODELS and cli.FORMATS == FORMATS


@pytest.mark.parametrize(("args", "env", "message"), [
    (["demo", "--devices", "3"], {}, r"fx-shard demo: error: output features \(256\) of model\.embed_tokens are not "
     r"divisible by mesh axis 'tp' \(3\); .* \(--devices 3 is that axis's size: try --devices 2, 4 or 8\)"),
    (["report", "llama", "--devices", "3"], {}, r"fx-shard report: error: output features \(256\) .* try --devices 2, 4 or 8\)"),
    (["report", "llama", "--set", "foo=1"], {}, r"fx-shard report: error: --set foo=1: LlamaConfig has no field foo; "
     r"its fields are head_dim, hidden_size"),
    (["report", "llama", "--set", "num_hidden_layers"], {}, r"fx-shard report: error: --set takes FIELD=VALUE"),
    (["demo", "--devices", "8"], {"CPU_NUM_DEVICES": "4"}, r"fx-shard demo: error: --devices 8, but CPU_NUM_DEVICES=4 is "
     r"set .*: run with --devices 4, or unset CPU_NUM_DEVICES"),
    (["report", "lama"], {}, r"fx-shard report: error: unknown model 'lama'; name a built-in model \(llama, "),
    (["report"], {}, r"fx-shard report: error: name a built-in model .* or 'all', or give --config PATH"),
    (["report", "llama", "--config", "config.json"], {}, r"fx-shard report: error: --config reports the configured "
     r"model alone, planned 'auto' without XLA: drop MODEL, --measure, --set and --plan"),
    (["report", "--config", "no/such/config.json"], {}, r"fx-shard report: error: --config no/such/config.json: not a "
     r"Hugging Face config this transformers reads"),
    (["report", "gpt2", "--measure", "--devices", "2"], {"CPU_NUM_DEVICES": "4", "PJRT_DEVICE": "CPU"},
     r"fx-shard report: error: --devices 2, but CPU_NUM_DEVICES=4 is set .*: run with --devices 4"),
])
def test_a_mistake_is_one_line(args, env, message, capsys, monkeypatch):
    # Each fails before any XLA runtime starts (this process must not start one).
    for name in _XLA_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert re.fullmatch(message + ".*\n", err), err
    # -v: the traceback instead.
    with pytest.raises(cli.UsageError):
        main(["-v", *args])


def test_devices_default_to_cpu_num_devices(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")
    assert cli._runtime_devices(None) == 4 and cli._runtime_devices(4) == 4
    monkeypatch.delenv("CPU_NUM_DEVICES")
    assert cli._runtime_devices(None) == 8 and cli._runtime_devices(2) == 2
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")  # not read off the CPU
    assert cli._runtime_devices(8) == 8


@pytest.mark.parametrize("shape", ["llama-3-70b", "mixtral-8x7b"])
def test_report_on_a_hugging_face_config_gives_the_bytes_per_device(shape, tmp_path, capsys):
    """A 70B-shaped config (2 of its 80 blocks) on the meta device: what each of 8 devices holds, by the plan."""
    import torch
    import transformers as t

    dims = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256, num_hidden_layers=2)
    if shape == "llama-3-70b":
        config = t.LlamaConfig(**dims, dtype=torch.bfloat16)
    else:
        config = t.MixtralConfig(**{**dims, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                                    "vocab_size": 32000}, num_local_experts=8, dtype=torch.bfloat16)
    config.to_json_file(tmp_path / "config.json")
    assert main(["report", "--config", str(tmp_path / "config.json"), "--devices", "8"]) == 0
    out = capsys.readouterr().out
    per_device = int(re.search(r"- parameters per device: ([\d,]+) B", out).group(1).replace(",", ""))
    h, layers = config.hidden_size, config.num_hidden_layers
    norms = (2 * layers + 1) * h * 2  # replicated; every matrix splits 8 ways (8 KV heads), bf16
    if shape == "llama-3-70b":
        matrices = 2 * config.vocab_size * h + layers * (2 * h * h + 2 * h * 1024 + 3 * h * config.intermediate_size)
        assert per_device == matrices * 2 // 8 + norms
    else:  # the experts and the router have no fx_shard style yet (the MoE issue): replicated
        sharded = 2 * config.vocab_size * h + layers * (2 * h * h + 2 * h * 1024)
        experts = layers * config.num_local_experts * (3 * h * config.intermediate_size + h)
        assert per_device == sharded * 2 // 8 + experts * 2 + norms
