"""The output guard (itda.cli.outputs): what counts as itda's own output, through the CLI."""

import json

from cli_helpers import run_bad, run_ok, synthetic_acts_file

from itda.cli.outputs import MANIFEST, Output, check_outputs, digest, is_own, record_outputs


def _files(tmp_path):
    acts = synthetic_acts_file(tmp_path / "acts.safetensors", 1200, 16, n_features=64, seed=3)
    d = tmp_path / "d.safetensors"
    run_ok(["build", str(acts), "--out", str(d), "--k", "4", "-q"])
    return acts, d


def test_a_report_is_replaced_only_while_it_is_as_itda_wrote_it(tmp_path):
    acts, d = _files(tmp_path)
    rep = tmp_path / "r.json"
    run_ok(["eval", str(d), str(acts), "--out", str(rep)])
    entry = json.loads((tmp_path / MANIFEST).read_text())["r.json"]
    assert entry == {"kind": "eval-report", "sha256": digest(rep)}
    run_ok(["eval", str(d), str(acts), "--out", str(rep), "--k", "2"])  # its own earlier output: replaced
    assert json.loads(rep.read_text())["k"] == 2
    rep.write_text(rep.read_text().replace("{", '{"my note": 1,', 1))  # edited by the user: theirs now
    run_bad(["eval", str(d), str(acts), "--out", str(rep)], "exists and is not an eval report file itda wrote")
    assert "my note" in rep.read_text()
    run_ok(["eval", str(d), str(acts), "--out", str(rep), "--overwrite"])
    assert "my note" not in rep.read_text() and is_own(Output(rep, "eval-report"))


def test_overwrite_never_replaces_an_input(tmp_path):
    acts, d = _files(tmp_path)
    before = digest(acts)
    run_bad(["eval", str(d), str(acts), "--out", str(acts), "--overwrite"], "also an input")
    run_bad(["compare", str(acts), str(acts), "--out", str(tmp_path), "--overwrite"], "holds the input")
    assert digest(acts) == before


def test_kinds_do_not_stand_in_for_each_other(tmp_path):
    acts, d = _files(tmp_path)
    assert is_own(Output(d, "dictionary")) and not is_own(Output(d, "sae")) and not is_own(Output(d, "eval-report"))
    rep = tmp_path / "r.json"
    run_ok(["eval", str(d), str(acts), "--out", str(rep)])
    run_bad(
        ["sae", "eval", str(d), str(acts), "--out", str(rep)], "exists and is not an SAE eval report"
    )  # refused before reading
    assert not is_own(Output(rep, "sae-eval-report"))


def test_a_foreign_manifest_is_left_alone(tmp_path):
    (tmp_path / MANIFEST).write_text("a file of the user's that happens to bear the name\n")
    out = tmp_path / "x.json"
    out.write_text("{}")
    record_outputs([Output(out, "eval-report")])
    assert (tmp_path / MANIFEST).read_text().startswith("a file of the user's")
    assert not is_own(Output(out, "eval-report"))


def test_folders_are_judged_whole(tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    record_outputs([Output(folder, "compare-report", folder=True)])
    check_outputs([Output(folder, "compare-report", folder=True)], [])
    (folder / "my_notes.txt").write_text("mine")  # a file added by the user: the folder is theirs too
    assert not is_own(Output(folder, "compare-report", folder=True))
