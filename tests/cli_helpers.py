"""Running the itda CLI in-process from tests (success, or exactly one error line with exit code 2),
and the synthetic activation files they run on."""

from typer.testing import CliRunner

from itda.cli.main import app

runner = CliRunner()


def run_ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def run_bad(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0] and lines[0].startswith("error: "), r.output
    return r


def synthetic_acts_file(path, n: int, d: int, *, n_features: int, seed: int):
    """An activation file (activations + refs) of synthetic sparse data at path; returns path."""
    from itda.activations.files import save_activations
    from itda.synthetic import synthetic_activations

    data = synthetic_activations(n, d, n_features=n_features, seed=seed)
    save_activations(path, data.acts, data.refs)
    return path
