"""The report: content, byte arithmetic, folding, formats, the CLI, and the reports checked in under docs/reports.

Everything here runs on the CPU with ``fx_shard.transform`` (no XLA); the
measured side is in tests/spmd/test_report.py.
"""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fx_shard
from fx_shard import models
from fx_shard.axes import local_shape
from fx_shard.cli import main
from fx_shard.errors import FxShardError
from fx_shard.models.plans import PLANS
from fx_shard.report import FORMATS, SCHEMA, parameter_bytes, report_data
from fx_shard.report.fold import _merge
from fx_shard.sharding import layer_parameters

REPORTS = Path(__file__).parent.parent / "docs" / "reports"
TP = 8
F32 = 4


def transformed(name: str, tp: int = TP, plan=None, **overrides):
    model = models.build(name, **overrides)
    inputs = models.example_inputs(name, **overrides)
    return fx_shard.transform(model, PLANS[name] if plan is None else plan, mesh_shape={"tp": tp}, example_inputs=inputs)


def sharded_layers(gm) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """{path: (style, {param: per-device shape})} for every layer with a sharded parameter, from the records."""
    mesh = gm.meta["sharding"].mesh_shape
    out: dict = {}
    for path, record, name, param in layer_parameters(gm):
        spec = record.specs.get(name)
        if spec and any(spec):
            out.setdefault(path, (record.style, {}))[1][name] = local_shape(param.shape, spec, mesh)
    return out


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row, code spans unwrapped and escapes removed."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[:\-| ]+\|$", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.append([re.sub(r"\\(.)", r"\1", c).strip("`") for c in cells])
    return rows


# ---------------------------------------------------------------- content


@pytest.mark.parametrize("name", models.MODELS)
def test_every_sharded_layer_is_named_with_its_style_and_per_device_shape(name):
    gm = transformed(name)
    expected = sharded_layers(gm)
    assert expected
    text = fx_shard.report(gm, fold=False)
    lines = text.splitlines()
    for path, (style, shapes) in expected.items():
        row = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(path)}\s+{style}\s", line)), None)
        assert row is not None, f"{path} ({style}) not in the report:\n{text}"
        # The layer's parameters: its first row and the continuation rows under it (blank module cell).
        block = [lines[row], *itertools.takewhile(lambda line: line.startswith(" "), lines[row + 1:])]
        for param, shape in shapes.items():
            per_device = re.escape("(" + ", ".join(map(str, shape)) + ")")
            assert any(re.search(rf"\s{param}\b.*\)\s+{per_device}\s", line) for line in block), "\n".join(block)
    data = report_data(gm)
    listed = {m: layer for layer in data["layers"] for m in layer["modules"]}
    for path, (style, shapes) in expected.items():
        assert listed[path]["style"] == style
        assert {p["name"]: tuple(p["per_device_shape"]) for p in listed[path]["parameters"] if any(p["spec"])} == shapes


def test_per_device_shapes_follow_the_spec():
    data = report_data(transformed("llama"), fold=False)
    layers = {layer["module"]: layer for layer in data["layers"]}
    q = layers["model.layers.0.self_attn.q_proj"]["parameters"][0]
    assert (q["global_shape"], q["spec"], q["per_device_shape"]) == ([64, 64], ["tp", None], [8, 64])
    down = layers["model.layers.1.mlp.down_proj"]["parameters"][0]
    assert (down["global_shape"], down["spec"], down["per_device_shape"]) == ([64, 128], [None, "tp"], [64, 16])
    embed = layers["model.embed_tokens"]["parameters"][0]
    assert (embed["spec"], embed["per_device_shape"]) == (["tp", None], [32, 64])
    k = layers["model.layers.0.self_attn.k_proj"]
    # 2 KV heads on 8 devices: over 2 blocks of 4 devices (FitHeadsToMesh, which says why).
    assert (k["parameters"][0]["spec"], k["parameters"][0]["per_device_shape"]) == (["tp:2", None], [8, 64])
    assert k["sharded"] and any("do not divide" in note for note in k["notes"])


def test_llama_parameter_bytes_by_arithmetic():
    c = models.make_config("llama")
    h, i, v, kv = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_key_value_heads * c.head_dim
    n = c.num_hidden_layers
    sharded = 2 * v * h + n * (h * h + h * h + 3 * i * h)  # embed, lm_head; q, o, gate, up, down: over all 8
    by_kv_head = n * 2 * kv * h  # k, v: 2 KV heads, each on a block of 4 devices ("tp:2")
    unplanned = n * 2 * h + h  # RMSNorm weights
    data = report_data(transformed("llama"))
    b = data["costs"]["parameter_bytes"]
    rows = {r["parameters"]: r for r in b["rows"]}
    assert rows["sharded"]["total"] == (sharded + by_kv_head) * F32
    assert rows["sharded"]["per_device"] == rows["sharded"]["per_device_ideal"] == (sharded // TP + by_kv_head // 2) * F32
    assert rows["replicated by the plan"]["per_device"] == 0
    assert rows["in no planned layer"]["per_device"] == unplanned * F32
    assert b["total"] == (sharded + by_kv_head + unplanned) * F32 == 410_880
    assert b["per_device"] == b["per_device_ideal"] == (sharded // TP + by_kv_head // 2 + unplanned) * F32 == 58_624
    assert (b["total"], b["per_device"], b["per_device_ideal"]) == parameter_bytes(transformed("llama"))
    assert data["summary"]["parameter_bytes_per_device"] == b["per_device"]
    text = fx_shard.report(transformed("llama"))
    assert re.search(r"^all\s+\d+\s+410,880 B \(401\.2 KiB\)\s+58,624 B \(57\.2 KiB\)\s+58,624 B", text, flags=re.M), text


def test_gpt2_counts_the_tied_lm_head_once():
    c = models.make_config("gpt2")
    h, v, p, n = c.n_embd, c.vocab_size, c.n_positions, c.n_layer
    block_sharded = (3 * h * h + 3 * h) + h * h + (4 * h * h + 4 * h) + 4 * h * h  # q/k/v, attn proj, fc, mlp proj weights
    block_replicated = h + h  # the two row-parallel biases
    sharded = v * h + n * block_sharded  # wte (the lm_head shares it)
    replicated = p * h + n * block_replicated  # wpe, by the plan
    unplanned = n * 4 * h + 2 * h  # ln_1, ln_2, ln_f
    gm = transformed("gpt2")
    b = report_data(gm)["costs"]["parameter_bytes"]
    assert b["total"] == (sharded + replicated + unplanned) * F32 == 482_304
    assert b["per_device"] == (sharded // TP + replicated + unplanned) * F32
    lm_head = next(layer for layer in report_data(gm)["layers"] if layer["module"] == "lm_head")
    assert lm_head["parameters"][0]["tied_to"] == "transformer.wte.weight"
    assert "weight (tied to transformer.wte.weight)" in fx_shard.report(gm)


def test_predicted_collectives_per_block_and_how():
    data = report_data(transformed("llama"))
    c = data["costs"]["collectives"]
    block, outside = c["blocks"]
    assert (block["block"], block["count"], block["blocks"]) == ("model.layers.0-1", 2, ["model.layers.0", "model.layers.1"])
    assert block["predicted"]["all-reduce"] == 2 and "self_attn.o_proj (rowwise" in block["from"]
    assert outside["block"] is None and outside["predicted"]["all-reduce"] == 1 and "model.embed_tokens (vocab" in outside["from"]
    assert c["predicted"] == {"all-reduce": 5, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}
    assert c["measured"] is None and "one all-reduce per call of a row-parallel layer" in c["method"]


def test_gather_output_predicts_an_all_gather():
    plan = {**PLANS["llama"], "lm_head": {"style": "lm_head", "gather_output": True}}
    c = report_data(transformed("llama", plan=plan))["costs"]["collectives"]
    assert c["predicted"]["all-gather"] == 1
    assert "lm_head (lm_head: all-gather)" in c["blocks"][-1]["from"]


def test_measured_counts_sit_beside_the_prediction():
    gm = transformed("gpt2")
    agree = fx_shard.report(gm, measured={"all-reduce": 5, "all-gather": 0})
    assert re.search(r"^measured \(partitioned HLO\)\s+5\s+0", agree, flags=re.M)
    assert "as predicted." in agree and "(measured: all-reduce 5)" in agree
    differ = fx_shard.report(gm, measured={"all-reduce": 5, "all-gather": 2})
    assert "differs, all-gather: predicted 0, measured 2." in differ


def test_the_diff_names_each_pass_and_what_it_changed():
    gm = transformed("gpt2")
    data = report_data(gm, fold=False)
    passes = {p["pass"]: p for p in data["diff"]["passes"]}
    assert list(passes) == list(gm.meta["sharding"].passes)
    split = passes["SplitFusedLinear"]
    assert (split["added"], split["removed"]) == (8, 2)  # per block: c_attn -> q, k, v and a cat
    rows = [r for r in data["diff"]["rows"] if r["pass"] == "SplitFusedLinear"]
    assert {"pass", "graph", "change", "node", "before", "after", "count", "members"} <= set(rows[0])
    removed = [r for r in rows if r["change"] == "removed"]
    assert [r["before"] for r in removed] == [
        "transformer.h.0.attn.c_attn(transformer_h_0_ln_1)", "transformer.h.1.attn.c_attn(transformer_h_1_ln_1)",
    ]
    rewritten = next(r for r in data["diff"]["rows"] if r["pass"] == "AttentionToEinsum")
    assert rewritten["before"].startswith("torch._C._nn.scaled_dot_product_attention(")
    assert rewritten["after"].startswith("fx_shard.ops.einsum_attention(")
    text = fx_shard.report(gm)
    # Counts first, then the rows per pass.
    assert text.index("SplitFusedLinear           1 of 1") < text.index("SplitFusedLinear: 8 added, 2 removed, 2 rewritten")
    assert re.search(r"^rewritten\s+2×\s+scaled_dot_product_attention\s+torch\._C\._nn\.scaled_dot_product_attention", text, flags=re.M)


# ---------------------------------------------------------------- folding


def test_a_4_layer_model_folds_its_blocks():
    gm = transformed("llama", num_hidden_layers=4)
    data = report_data(gm)
    layers = {layer["module"]: layer for layer in data["layers"]}
    assert list(layers) == [
        "model.embed_tokens",
        *(f"model.layers.0-3.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        "lm_head",
    ]
    down = layers["model.layers.0-3.mlp.down_proj"]
    assert down["count"] == 4 and down["modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    text = fx_shard.report(gm)
    assert re.search(r"^model\.layers\.0-3\.self_attn\.q_proj\s+4×\s+colwise\s+weight\s+\(64, 64\)\s+\(8, 64\)", text, flags=re.M)
    assert "model.layers.1" not in text.split("2. Layers")[1].split("3. Costs")[0]
    (block, outside) = data["costs"]["collectives"]["blocks"]
    assert (block["block"], block["count"], block["predicted"]["all-reduce"]) == ("model.layers.0-3", 4, 2)
    assert data["costs"]["collectives"]["predicted"]["all-reduce"] == 4 * 2 + 1
    einsum = [r for r in data["diff"]["rows"] if r["pass"] == "AttentionToEinsum"]
    assert len(einsum) == 1 and einsum[0]["count"] == 4
    unplanned = {r["module"]: r["count"] for r in data["left_alone"]["unplanned"]}
    assert unplanned == {"model.layers.0-3.input_layernorm": 4, "model.layers.0-3.post_attention_layernorm": 4, "model.norm": 1}
    unfolded = report_data(gm, fold=False)
    assert len(unfolded["layers"]) == 2 + 4 * 7 and all(layer["count"] == 1 for layer in unfolded["layers"])
    assert re.search(r"^model\.layers\.3\.mlp\.down_proj\s+rowwise\s", fx_shard.report(gm, fold=False), flags=re.M)


def test_a_different_block_breaks_the_fold():
    # Layer 2's down projection replicated: it no longer folds with layers 0, 1 and 3.
    plan = {"model.layers.2.mlp.down_proj": "replicate", **PLANS["llama"]}
    data = report_data(transformed("llama", plan=plan, num_hidden_layers=4))
    downs = {layer["module"]: layer["count"] for layer in data["layers"] if layer["module"].endswith("down_proj")}
    assert downs == {"model.layers.{0-1,3}.mlp.down_proj": 3, "model.layers.2.mlp.down_proj": 1}
    blocks = {b["block"]: b["predicted"]["all-reduce"] for b in data["costs"]["collectives"]["blocks"]}
    assert blocks == {"model.layers.{0-1,3}": 2, "model.layers.2": 1, None: 1}


def test_merge_writes_indices_as_ranges():
    assert _merge(["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"], "path") == "layers.0-2.mlp"
    assert _merge([f"layers.{i}.mlp" for i in (0, 1, 3, 7)], "path") == "layers.{0-1,3,7}.mlp"
    assert _merge([f"layers.{i}.mlp" for i in (0, 2, 4, 6)], "path") == "layers.*.mlp"
    assert _merge(["layers_0_mlp_fc1(x_3)", "layers_1_mlp_fc1(x_9)"], "text") == "layers_0-1_mlp_fc1(x_3)"
    assert _merge(["style"] * 2, "exact") == "style"


def test_the_fold_note_only_when_a_row_is_folded():
    note = "A row with a count (×) stands for that many rows"
    folded = fx_shard.report(transformed("llama"))
    assert folded.count(note) == 1 and folded.index(note) < folded.index("scaled_dot_product_attention  ")
    assert note not in fx_shard.report(transformed("llama"), fold=False)
    # One block: nothing to fold, so no note even when folding.
    single = transformed("llama", num_hidden_layers=1)
    assert all(r["count"] == 1 for r in report_data(single)["layers"]) and note not in fx_shard.report(single)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("name", models.MODELS)
def test_text_in_a_width(name):
    gm = transformed(name)
    wide = fx_shard.report(gm, fold=False)
    assert max(map(len, wide.splitlines())) > 100
    narrow = fx_shard.report(gm, width=100)
    lines = narrow.splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(line for line in lines if len(line) > 100)
    # Nothing is dropped: each layer's style and why, each diff row's node text, up to where lines wrap.
    flat = " ".join(narrow.split())
    data = report_data(gm)
    for layer in data["layers"]:
        assert " ".join("; ".join([layer["source"], *layer["notes"]]).split()) in flat, layer["module"]
    for row in data["diff"]["rows"][:20]:
        assert all(" ".join(row[k].split()) in flat for k in ("before", "after")), row
    # Module paths stay whole: the other columns wrap first (gpt2's "weight (tied to transformer.wte.weight)").
    for layer in data["layers"]:
        assert re.search(rf"^{re.escape(layer['module'])}\s", narrow, flags=re.M), layer["module"]
    # A layer's long "why" goes under its row (and its parameters' rows), the table's columns keep one line each.
    if name == "llama":
        k_proj = next(i for i, line in enumerate(lines) if line.startswith("model.layers.0-1.self_attn.k_proj  2×"))
        assert re.match(r"model\.layers\.0-1\.self_attn\.k_proj\s+2×\s+colwise\s+weight\s+\(16, 64\)\s+\(8, 64\)\s+\(tp:2, -\)$",
                        lines[k_proj])
        assert lines[k_proj + 1].startswith("    why: plan entry '*.self_attn.k_proj'; 2 heads (head_dim 8)")
        assert lines[k_proj + 2].startswith("         ")


def test_only_some_sections():
    from fx_shard.report.render.text import TextRenderer

    data = report_data(transformed("llama"))
    layers = TextRenderer(100).render(data, ["layers"])
    assert layers.startswith("Layers: how each is split, and why\n") and "Graph diff" not in layers and "Costs" not in layers
    # The fold note moves to the first table shown with a folded row.
    assert "fx_shard report:" not in layers and layers.index("A row with a count (×)") < layers.index("module ")
    assert TextRenderer().render(data) == fx_shard.report(transformed("llama"))
    with pytest.raises(ValueError, match=r"unknown report sections \['cost'\]; the sections are header, diff"):
        TextRenderer().render(data, ["cost"])
    with pytest.raises(ValueError, match="width= applies to the text format only"):
        fx_shard.report(transformed("llama"), "markdown", width=100)



def test_json_round_trips_with_stable_keys():
    gm = transformed("vit")
    data = json.loads(fx_shard.report(gm, "json"))
    assert data == report_data(gm)
    assert list(data) == ["schema", "model", "mesh", "tp_axis", "passes", "graphs", "summary", "check", "diff", "layers", "costs",
                          "left_alone"]
    assert data["schema"] == SCHEMA and data["mesh"] == {"tp": 8} and data["tp_axis"] == "tp" and data["graphs"] == [""]
    assert data["check"] is None  # transform runs no self-check
    assert set(data["summary"]) == {"layers", "sharded", "replicated", "graphs", "opaque_modules", "parameter_bytes",
                                    "parameter_bytes_per_device", "collectives_predicted"}
    assert set(data["diff"]) == {"passes", "rows"}
    assert set(data["layers"][0]) == {"module", "count", "modules", "graph", "style", "sharded", "source", "notes", "parameters"}
    assert set(data["layers"][0]["parameters"][0]) == {"name", "global_shape", "spec", "per_device_shape", "tied_to"}
    assert set(data["costs"]) == {"parameter_bytes", "collectives"}
    assert set(data["costs"]["parameter_bytes"]) == {"rows", "tensors", "total", "per_device", "per_device_ideal", "measured_per_device"}
    assert set(data["costs"]["collectives"]) == {"method", "blocks", "predicted", "measured"}
    assert set(data["left_alone"]) == {"opaque", "replicated", "unplanned", "code_kept"}
    head = next(r for r in data["left_alone"]["replicated"] if r["module"] == "head")
    assert head["source"] == "plan entry 'head'" and head["count"] == 1
    assert {r["module"] for r in data["left_alone"]["unplanned"]} >= {"", "patch_embed.proj", "norm"}


@pytest.mark.parametrize("format", ["markdown", "github"])
def test_markdown_tables(format):
    text = fx_shard.report(transformed("llama"), format)
    assert text.startswith("# fx\\_shard report: Llama on mesh")
    for heading in ("## 1. Graph diff", "## 2. Layers", "## 3. Costs", "### Collectives per forward", "## 4. Left alone"):
        assert heading in text
    rows = markdown_rows(text)
    assert ["model.layers.0-1.self_attn.q_proj", "2×", "colwise", "weight", "(64, 64)", "(8, 64)", "(tp, -)",
            "plan entry '*.self_attn.q_proj'"] in rows
    assert all("'*." not in line for line in text.splitlines() if line.startswith("|"))  # globs escaped
    assert ("|:--" in text) == (format == "markdown")


def test_unknown_format_and_untransformed_model():
    with pytest.raises(ValueError, match="valid formats: text, markdown, github, json"):
        fx_shard.report(transformed("gpt2"), "html")
    with pytest.raises(FxShardError, match="report on what fx_shard.transform or fx_shard.shard returned"):
        fx_shard.report(models.build("gpt2"))
    assert FORMATS == ("text", "markdown", "github", "json")


def test_the_report_does_not_import_torch_xla():
    code = (
        "import sys, fx_shard\n"
        "from fx_shard import models\n"
        "gm = fx_shard.transform(models.build('gpt2'), 'auto', mesh_shape={'tp': 8}, example_inputs=models.example_inputs('gpt2'))\n"
        "for f in ('text', 'markdown', 'json'): fx_shard.report(gm, f)\n"
        "assert 'torch_xla' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_model_captured_part_by_part():
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import build_hf, hf_inputs

    gm = fx_shard.transform(build_hf("llama"), "auto", mesh_shape={"tp": 8}, example_kwargs=hf_inputs())
    data = report_data(gm)
    opaque = {r["module"]: r for r in data["left_alone"]["opaque"]}
    assert opaque["model.layers.0-1.self_attn"]["count"] == 2
    assert "co_varnames is too small" in opaque[""]["reason"]
    layers = {layer["module"]: layer for layer in data["layers"]}
    assert layers["model.layers.0-1.self_attn.o_proj"]["graph"] is None  # planned as a module
    assert layers["model.layers.0-1.mlp.down_proj"]["graph"] == "model.layers.0-1.mlp"
    assert data["costs"]["collectives"]["predicted"]["all-reduce"] == 5
    text = fx_shard.report(gm)
    assert re.search(r"^model\.layers\.0-1\.self_attn\.o_proj\s+2×\s+\(module\)\s+rowwise", text, flags=re.M)
    assert "captured part by part" in text
    narrow = fx_shard.report(gm, width=100).splitlines()
    assert max(map(len, narrow)) <= 100 and re.search(r"^module\s+×\s+graph\s+style", "\n".join(narrow), flags=re.M)


# ---------------------------------------------------------------- the CLI


def test_cli_report_json(capsys):
    assert main(["report", "gpt2", "--devices", "4", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "GPT2" and data["mesh"] == {"tp": 4}


def test_cli_report_folds_and_writes_files(tmp_path, capsys):
    assert main(["report", "llama", "--set", "num_hidden_layers=4", "--plan", "auto", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'llama.txt'}"
    text = (tmp_path / "llama.txt").read_text()
    assert re.search(r"^model\.layers\.0-3\.mlp\.down_proj\s+4×\s+rowwise\s", text, flags=re.M)
    assert "inferred: row-parallel after model.layers.0-3.mlp.gate_proj" in text
    assert main(["report", "llama", "--format", "markdown", "--no-fold", "--output-dir", str(tmp_path)]) == 0
    saved = (tmp_path / "llama.md").read_text()
    assert saved.startswith("<!-- generated by `fx-shard report llama --devices 8 --format markdown --no-fold`")
    assert "`model.layers.1.mlp.down_proj`" in saved


def test_cli_rejects_a_bad_override(capsys):
    assert main(["report", "llama", "--set", "num_hidden_layers"]) == 2
    assert capsys.readouterr().err == "fx-shard report: error: --set takes FIELD=VALUE (e.g. num_hidden_layers=4), not 'num_hidden_layers'\n"


# ---------------------------------------------------------------- docs/reports


@pytest.mark.parametrize("name", models.MODELS)
def test_checked_in_report(name):
    """docs/reports/<model>.md: every sharded layer with its style and per-device shape, the right bytes,
    collectives measured as predicted. (tests/spmd/test_report.py regenerates it at 8 devices and compares.)"""
    path = REPORTS / f"{name}.md"
    assert path.is_file(), f"{path} missing; regenerate: fx-shard report all --devices 8 --measure --format markdown --output-dir docs/reports"
    text = path.read_text()
    assert text.startswith(f"<!-- generated by `fx-shard report {name} --devices 8 --format markdown --measure`")
    gm = transformed(name)
    data = report_data(gm)
    rows = markdown_rows(text)
    layer_rows = {row[0]: row for row in rows if len(row) == 8}
    for layer in data["layers"]:
        if not layer["sharded"]:
            continue
        row = layer_rows.get(layer["module"])
        assert row is not None, f"{layer['module']} not in {path}"
        first = layer["parameters"][0]
        assert row[2] == layer["style"] and row[3].split(" ")[0] == first["name"]
        assert row[5] == "(" + ", ".join(map(str, first["per_device_shape"])) + ")"
    named = {m for layer in data["layers"] for m in layer["modules"]}
    assert set(sharded_layers(gm)) <= named
    b = data["costs"]["parameter_bytes"]
    all_row = next(row for row in rows if row[0] == "all")
    assert all_row[2].startswith(f"{b['total']:,} B") and all_row[3].startswith(f"{b['per_device']:,} B")
    assert f"Measured on the device (torch_xla's shards): {b['per_device']:,} B" in text.replace("\\_", "_")
    assert "Measured in XLA's partitioned HLO of one forward: as predicted." in text
