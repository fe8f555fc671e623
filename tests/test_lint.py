"""lint: every graph the project exports passes; hand-made graphs with TensorRT traps are flagged."""

from __future__ import annotations

import json

import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h

from asdm_export.build.lint import DEFAULT_OPS, OpsTable, lint_model, lint_paths
from asdm_export.cli import main
from asdm_export.cli.engines import build, lint
from asdm_export.errors import InputError

for _command in (lint, build):  # until cli.py registers them; a no-op afterwards
    main.add_command(_command)


@pytest.fixture(scope="module")
def table() -> OpsTable:
    return OpsTable.load()


def model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset), *(h.make_opsetid(d, 1) for d in domains)])


def vi(name, dtype, shape=None):
    return h.make_tensor_value_info(name, dtype, shape)


def codes(report, severity=None) -> set[str]:
    return {f["code"] for f in report["findings"] if severity is None or f["severity"] == severity}


# ---- the data file -----------------------------------------------------------------------------------------

def test_ops_file_names_its_source_and_is_the_real_list(table):
    src = table.source
    assert src["repository"] == "onnx/onnx-tensorrt" and src["file"] == "docs/operators.md"
    assert len(src["commit"]) == 40 and src["ref"].startswith("release/10.")
    assert table.tensorrt.startswith("10.") and (table.opset_min, table.opset_max) == (9, 20)
    ops = table.operators
    assert len(ops) > 180
    # rows as onnx-tensorrt states them for TensorRT 10.x
    assert ops["Conv"]["supported"] and ops["Conv"]["types"] == {"FP32", "FP16", "BF16"}
    assert not ops["Unique"]["supported"] and not ops["BitShift"]["supported"]
    assert "INT64" in ops["Add"]["types"] and "INT64" not in ops["MatMul"]["types"]
    assert ops["NonZero"]["supported"]  # supported, yet a data-dependent shape (flagged apart)
    assert "INT64" in ops["ConstantOfShape"]["types"]  # the source's 'INF64' slip is repaired, and recorded
    assert any("INF64" in r for r in yaml.safe_load(DEFAULT_OPS.read_text())["repairs"])


def test_broken_ops_file_is_one_line_error(tmp_path):
    bad = tmp_path / "ops.yaml"
    bad.write_text("tensorrt: 10\noperators: [1, 2]\n")
    with pytest.raises(InputError, match="is not a TensorRT operator list") as err:
        OpsTable.load(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="is missing"):
        OpsTable.load(tmp_path / "absent.yaml")


# ---- every graph the project exports passes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def block_bundle(tmp_path_factory, tiny_dir):
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule

    out = tmp_path_factory.mktemp("lint") / "block"
    export_bundle("asdm:tiny", out, inheritance=InheritanceSpec(level="block", branch=0),
                  schedule=Schedule.parse("uniform:3", 10, None, ("unet",)))
    return out


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, tiny_dir):
    from asdm_export.export import export_bundle

    out = tmp_path_factory.mktemp("lint") / "fp16"
    export_bundle("asdm:tiny", out, precision="fp16")
    return out


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, tiny_dir):
    """An ME-CondConv student (input router) re-parameterized to dynamic aggregation: per-sample kernels and one
    grouped convolution, whose reshapes must keep static-profile shapes."""
    from asdm_export.assembly.assemble import assemble
    from asdm_export.assembly.reparam import reparam
    from asdm_export.export import export_bundle

    root = tmp_path_factory.mktemp("lint")
    assemble(str(tiny_dir), "bk-small", root / "student")
    reparam(str(root / "student"), root / "deploy")
    export_bundle(str(tiny_dir), root / "b", unets={"unet": str(root / "deploy")})
    return root / "b"


@pytest.mark.parametrize("which", ["tiny_bundle", "block_bundle", "fp16_bundle", "student_bundle"])
def test_exported_graphs_pass(which, request, table):
    bundle = request.getfixturevalue(which)
    report = lint_paths([bundle], table)
    names = [g["name"] for g in report["graphs"]]
    assert {"text_encoder", "vae_decoder"} <= set(names)
    assert any(n.startswith("unet") for n in names)
    if which == "block_bundle":
        assert {"unet.full", "unet.inherit"} <= set(names)
    for g in report["graphs"]:
        assert g["errors"] == 0 and g["warnings"] == 0, (g["name"], g["findings"])
        assert g["nodes"] > 50 and "int64" in g["dtypes"]  # shape arithmetic is int64: not reported
    assert report["passed"]
    if which == "fp16_bundle":
        assert "float16" in next(g for g in report["graphs"] if g["name"] == "unet")["dtypes"]


# ---- hand-made traps ---------------------------------------------------------------------------------------

def test_unsupported_op(table):
    m = model([h.make_node("Relu", ["x"], ["r"]), h.make_node("Unique", ["r"], ["u"]),
               h.make_node("BitShift", ["a", "a"], ["b"], direction="LEFT")],
              [vi("x", T.FLOAT, [4]), vi("a", T.INT32, [4])], [vi("u", T.FLOAT), vi("b", T.INT32, [4])])
    r = lint_model(m, "g", table)
    unsupported = [f for f in r["findings"] if f["code"] == "unsupported-op"]
    assert {f["where"][0].split("(")[0] for f in unsupported} == {"Unique", "BitShift"}
    assert all(f["severity"] == "error" for f in unsupported) and r["errors"] == 2  # one error per node


def test_op_missing_from_the_list_and_custom_domain(table):
    m = model([h.make_node("Relu", ["x"], ["y"]), h.make_node("FusedThing", ["y"], ["z"], domain="com.example")],
              [vi("x", T.FLOAT, [4])], [vi("z", T.FLOAT, [4])], domains=["com.example"])
    r = lint_model(m, "g", table)
    assert codes(r, "error") == {"custom-domain"}
    m2 = model([h.make_node("NotAnOnnxOp", ["x"], ["z"])], [vi("x", T.FLOAT, [4])], [vi("z", T.FLOAT, [4])])
    f = lint_model(m2, "g", table)["findings"][0]
    assert f["code"] == "unsupported-op" and "does not list it" in f["message"]


def test_int64_traps(table):
    # int64 inputs into Add (TensorRT 10 takes INT64 there): warnings only, with what was checked
    ok = model([h.make_node("Add", ["a", "b"], ["c"])], [vi("a", T.INT64, [2]), vi("b", T.INT64, [2])],
               [vi("c", T.INT64, [2])])
    r = lint_model(ok, "g", table)
    assert r["errors"] == 0 and codes(r, "warning") == {"int64-io"}
    assert any("input 'a'" in f["message"] for f in r["findings"])
    # ... computed further (not shape arithmetic) and into MatMul, which TensorRT runs in float types only
    bad = model([h.make_node("Add", ["a", "b"], ["c"]), h.make_node("MatMul", ["c", "w"], ["d"]),
                 h.make_node("Cast", ["d"], ["e"], to=T.FLOAT)],
                [vi("a", T.INT64, [2, 2]), vi("b", T.INT64, [2, 2])], [vi("e", T.FLOAT, [2, 2])],
                [h.make_tensor("w", T.INT64, [2, 2], [1, 2, 3, 4])])
    r = lint_model(bad, "g", table)
    assert codes(r, "error") == {"int64-op"}
    assert "MatMul computes in INT64" in next(f for f in r["findings"] if f["code"] == "int64-op")["message"]
    assert {"int64-io", "int64-data"} <= codes(r, "warning")


def test_shape_arithmetic_in_int64_is_not_reported(table):
    m = model([h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "i0"], ["n"]),
               h.make_node("Mul", ["n", "two"], ["n2"]), h.make_node("Concat", ["n2", "one"], ["shape"], axis=0),
               h.make_node("Reshape", ["x", "shape"], ["y"])],
              [vi("x", T.FLOAT, ["b", 4])], [vi("y", T.FLOAT)],
              [h.make_tensor("i0", T.INT64, [1], [0]), h.make_tensor("two", T.INT64, [1], [2]),
               h.make_tensor("one", T.INT64, [1], [-1])])
    r = lint_model(m, "g", table)
    assert r["findings"] == []


def test_double_tensors(table):
    m = model([h.make_node("Cast", ["x"], ["d"], to=T.DOUBLE), h.make_node("Add", ["d", "d"], ["e"]),
               h.make_node("Cast", ["e"], ["y"], to=T.FLOAT)],
              [vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT, [4])])
    r = lint_model(m, "g", table)
    assert codes(r, "error") == {"double"}
    f = next(f for f in r["findings"] if f["code"] == "double")
    assert set(f["where"]) == {"d", "e"} and "float64" in f["message"]


def test_data_dependent_shapes(table):
    m = model([h.make_node("NonZero", ["x"], ["nz"]),
               h.make_node("Cast", ["x"], ["xi"], to=T.INT64), h.make_node("Reshape", ["x", "xi"], ["r"]),
               h.make_node("Shape", ["x"], ["s"]), h.make_node("Expand", ["x", "s"], ["e"])],
              [vi("x", T.FLOAT, [4])], [vi("nz", T.INT64), vi("r", T.FLOAT), vi("e", T.FLOAT)])
    r = lint_model(m, "g", table)
    dd = [f for f in r["findings"] if f["code"] == "data-dependent-shape"]
    assert {f["where"][0] for f in dd} == {"NonZero(nz)", "r"}  # Expand by Shape(x) is fine
    assert all(f["severity"] == "error" for f in dd)


def test_checkable_restrictions(table):
    m = model([h.make_node("Slice", ["x", "st", "en", "ax"], ["y"]),
               h.make_node("Resize", ["x", "", "sc"], ["z"], mode="cubic"),
               h.make_node("Slice", ["x", "st", "en", "cax"], ["w"])],
              [vi("x", T.FLOAT, [4]), vi("ax", T.INT64, [1])],
              [vi("y", T.FLOAT), vi("z", T.FLOAT), vi("w", T.FLOAT)],
              [h.make_tensor("st", T.INT64, [1], [0]), h.make_tensor("en", T.INT64, [1], [2]),
               h.make_tensor("cax", T.INT64, [1], [0]), h.make_tensor("sc", T.FLOAT, [1], [2.0])])
    r = lint_model(m, "g", table)
    restr = [f for f in r["findings"] if f["code"] == "restriction"]
    msgs = " | ".join(f["message"] for f in restr)
    assert "input 'axes' must be an initializer" in msgs and "mode=cubic" in msgs
    assert [f["where"] for f in restr if "axes" in f["message"]] == [["Slice(y)"]]  # not the constant one


def test_opset_out_of_range(table):
    m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT, [4])], opset=8)
    assert codes(lint_model(m, "g", table)) == {"opset"}
    for ends in (table.opset_min, table.opset_max):  # the table's range includes both ends
        m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT, [4])], opset=ends)
        assert "opset" not in codes(lint_model(m, "g", table)), ends


def test_uint8_inside_the_network_and_value_dependence_through_any_input(table):
    """UINT8 is a TensorRT network input or output type only; a shape computed from input values is data
    dependent whichever input of a node carries them (here the second of an Add)."""
    inner = model([h.make_node("Cast", ["x"], ["u"], to=T.UINT8), h.make_node("Cast", ["u"], ["y"], to=T.FLOAT)],
                  [vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT, [4])])
    f = next(f for f in lint_model(inner, "g", table)["findings"] if f["code"] == "dtype")
    assert f["severity"] == "error" and "uint8" in f["message"] and f["where"] == ["u"]
    reshaped = model([h.make_node("Cast", ["x"], ["xi"], to=T.INT64), h.make_node("Add", ["one", "xi"], ["s"]),
                      h.make_node("Reshape", ["x", "s"], ["r"])],
                     [vi("x", T.FLOAT, [4])], [vi("r", T.FLOAT)], [h.make_tensor("one", T.INT64, [1], [1])])
    dd = [f for f in lint_model(reshaped, "g", table)["findings"] if f["code"] == "data-dependent-shape"]
    assert [f["where"] for f in dd] == [["r"]]


def test_subgraph_ops_are_checked(table):
    then = h.make_graph([h.make_node("Unique", ["x"], ["t"])], "then", [], [vi("t", T.FLOAT)])
    other = h.make_graph([h.make_node("Relu", ["x"], ["o"])], "else", [], [vi("o", T.FLOAT)])
    m = model([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
              [vi("c", T.BOOL, []), vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT)])
    r = lint_model(m, "g", table)
    assert "unsupported-op" in codes(r, "error") and "control-flow" in codes(r, "warning")


# ---- the command -------------------------------------------------------------------------------------------

def write(m, path):
    onnx.save(m, str(path))
    return path


def test_the_module_docstring_lists_every_finding_code_under_its_severity():
    """The docstring is the catalogue readers of --json go by: a code added without it went unlisted."""
    import inspect
    import re

    import asdm_export.build.lint as lint

    emitted = set(re.findall(r'add\("(error|warning)", "([a-z0-9-]+)"', inspect.getsource(lint)))
    errors_part, _, warnings_part = lint.__doc__.partition("\nwarnings\n")
    listed = {("error", c) for c in re.findall(r"^  ``([a-z0-9-]+)``", errors_part, re.M)}
    listed |= {("warning", c) for c in re.findall(r"^  ``([a-z0-9-]+)``", warnings_part, re.M)}
    assert len(emitted) >= 14 and emitted == listed, (emitted - listed, listed - emitted)


def test_cli_exit_codes_table_and_json(tmp_path, tiny_bundle):
    runner = CliRunner()
    res = runner.invoke(main, ["lint", str(tiny_bundle), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "unet" in res.output and "TensorRT 10.1" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["target"]["source"]["repository"] == "onnx/onnx-tensorrt"

    warn = write(model([h.make_node("Add", ["a", "a"], ["c"])], [vi("a", T.INT64, [2])], [vi("c", T.INT64, [2])]),
                 tmp_path / "warn.onnx")
    assert runner.invoke(main, ["lint", str(warn)]).exit_code == 0  # warnings do not fail ...
    assert runner.invoke(main, ["lint", str(warn), "--strict"]).exit_code == 1  # ... unless --strict
    # and the report says the verdict the exit code gives (--strict's was the CLI's alone: the report passed)
    res = runner.invoke(main, ["lint", str(warn), "--strict", "--json", "-"])
    assert res.exit_code == 1 and json.loads(res.output)["passed"] is False
    assert lint_paths([warn])["passed"] and not lint_paths([warn], strict=True)["passed"]

    bad = write(model([h.make_node("Unique", ["x"], ["u"])], [vi("x", T.FLOAT, [4])], [vi("u", T.FLOAT)]),
                tmp_path / "bad.onnx")
    res = runner.invoke(main, ["lint", str(tiny_bundle), str(bad), "--json", "-"])
    assert res.exit_code == 1
    report = json.loads(res.output)  # '-': the JSON alone on stdout
    assert not report["passed"] and [g["name"] for g in report["graphs"]][-1] == "bad"

    res = runner.invoke(main, ["lint", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "does not exist" in res.output
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    res = runner.invoke(main, ["lint", str(tmp_path / "junk.onnx")])
    assert res.exit_code == 2 and "not a valid ONNX model" in res.output


def test_a_graph_whose_external_weights_are_missing_or_cut_short_fails(tmp_path, table):
    """Weights kept beside the graph (models over 2 GB): lint reads no weights, and passed a graph whose data
    file was missing or truncated; a builder then failed on it."""
    import numpy as np

    weight = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = model([h.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", T.FLOAT, [1, 64])], [vi("y", T.FLOAT, [1, 64])],
                  initializers=[weight])
    path = tmp_path / "g.onnx"
    onnx.save(graph, str(path), save_as_external_data=True, location="g.data", size_threshold=0)
    assert lint_paths([path], table)["passed"]
    data = (tmp_path / "g.data").read_bytes()
    for damage, needle in ((data[:100], "is shorter than its tensors need"), (None, "is not beside it")):
        (tmp_path / "g.data").unlink(missing_ok=True)
        if damage is not None:
            (tmp_path / "g.data").write_bytes(damage)
        report = lint_paths([path], table)
        assert not report["passed"] and codes(report["graphs"][0], "error") == {"external-data"}
        assert needle in report["graphs"][0]["findings"][0]["message"]
