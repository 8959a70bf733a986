"""`itda build --mode reference` against the public reference trainer, run unchanged, on one stream.

The reference trainer is imported from a checkout you provide (`--reference-repo`, the
repository davidkaczer/itda; nothing of it is copied here). Its optional imports that are not
needed for `ITDATrainer.update` (wandb, socketio, transformer_lens) are stubbed if missing.
Both get the same float32 activations in the same order, as batches of B sequences x S
tokens (the reference's [B, S, D] input); atoms are compared by source row
(reference: global sequence * S + token position). Writes out/reference_fidelity.json.
Usage: python benchmarks/quality/reference_fidelity.py --reference-repo PATH [--acts FILE] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result

from itda.activations.files import load_activations
from itda.builder import build_dictionary


def import_reference_trainer(repo: Path, commit: str | None):
    src = repo / "train.py"
    if commit or not src.exists():
        text = subprocess.run(
            ["git", "--git-dir", str(repo), "show", f"{commit or 'HEAD'}:train.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        src = Path(tempfile.mkdtemp()) / "reference_train.py"
        src.write_text(text)
    for name in ("wandb", "socketio", "socketio.exceptions"):
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.ConnectionError = type("ConnectionError", (Exception,), {})
            sys.modules[name] = mod
    spec = importlib.util.spec_from_file_location("reference_train", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ITDATrainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--reference-repo", type=Path, required=True, help="checkout (or bare git dir) of the reference code"
    )
    ap.add_argument("--commit", default=None, help="reference commit to run (default: the checkout's HEAD)")
    ap.add_argument("--acts", type=Path, default=OUT / "sae_acts" / "smollm2_L15_train_131072.safetensors")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--seqs", type=int, default=16, help="sequences per batch (B)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (S)")
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=0.000535)
    args = ap.parse_args()
    x = load_activations(args.acts).acts[: args.tokens].float()
    d = x.shape[1]
    per = args.seqs * args.seq_len
    n_batches = x.shape[0] // per
    x = x[: n_batches * per]
    Trainer = import_reference_trainer(args.reference_repo, args.commit)
    trainer = Trainer(
        layer=0,
        steps=n_batches,
        activation_dim=d,
        k=args.k,
        loss_threshold=args.threshold,
        lm_name="-",
        dataset="-",
        seq_len=args.seq_len,
        batch_size=args.seqs,
        device="cpu",
    )
    t0 = time.perf_counter()
    for step in range(n_batches):
        trainer.update(step, x[step * per : (step + 1) * per].view(args.seqs, args.seq_len, d))
    ref_s = time.perf_counter() - t0
    ref_idx = trainer.itda.atom_indices
    ref_rows = (ref_idx[:, 0] * args.seq_len + ref_idx[:, 1]).tolist()

    refs = torch.full((x.shape[0], 5), -1, dtype=torch.int64)
    refs[:, 0] = torch.arange(x.shape[0])
    t0 = time.perf_counter()
    ours = build_dictionary(
        ((x[s : s + per], refs[s : s + per]) for s in range(0, x.shape[0], per)),
        k=args.k,
        threshold=args.threshold,
        mode="reference",
    )
    ours_s = time.perf_counter() - t0
    improved_s0 = time.perf_counter()
    improved = build_dictionary(
        ((x[s : s + per], refs[s : s + per]) for s in range(0, x.shape[0], per)),
        k=args.k,
        threshold=args.threshold,
        mode="improved",
    )
    improved_s = time.perf_counter() - improved_s0
    our_rows = ours.refs[:, 0].tolist()
    a, b = set(ref_rows), set(our_rows)
    seeds_ref, seeds_ours = set(ref_rows[:d]), set(our_rows[:d])
    atoms_equal = bool(torch.equal(trainer.itda.atoms.float(), ours.atoms))
    result = {
        "acts": str(args.acts),
        "tokens": x.shape[0],
        "batch": f"{args.seqs} x {args.seq_len}",
        "k": args.k,
        "threshold": args.threshold,
        "reference_commit": args.commit or "HEAD",
        "reference_atoms": len(ref_rows),
        "itda_reference_atoms": len(our_rows),
        "jaccard_sources": len(a & b) / len(a | b),
        "jaccard_seed_atoms": len(seeds_ref & seeds_ours) / len(seeds_ref | seeds_ours),
        "same_order": ref_rows == our_rows,
        "atoms_bit_identical": atoms_equal,
        "reference_s": ref_s,
        "itda_reference_s": ours_s,
        "itda_improved_s": improved_s,
        "itda_improved_atoms": len(improved),
    }
    print(result)
    write_result("reference_fidelity", result)


if __name__ == "__main__":
    main()
