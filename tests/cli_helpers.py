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


def kill_after_checkpoints(start, ck, out, kills: int, seed: int = 7, wait_s: float = 120) -> int:
    """Run `start()` (a new Popen) again and again, each time SIGKILLing it at a random moment after
    it has written checkpoint `ck` anew, until `kills` kills or `out` exists; returns the kills.
    Between kills `out` must not exist (a killed run leaves no partial output)."""
    import random
    import signal
    import time

    rng, done = random.Random(seed), 0
    for _ in range(kills + 5):
        before = ck.stat().st_mtime_ns if ck.exists() else None
        proc = start()
        deadline = time.time() + wait_s
        while proc.poll() is None and time.time() < deadline and not (ck.exists() and ck.stat().st_mtime_ns != before):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done += 1
        proc.wait()
        if out.exists() or done == kills:
            break
    return done
