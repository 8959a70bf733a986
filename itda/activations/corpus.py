"""Corpora: documents from files or datasets, tokenized with character offsets, packed into contexts.

Sources: a .txt file (one document), a folder of .txt files (one each, sorted by name),
JSONL (one document per line, field `text` or --field), Parquet (column `text`, needs pyarrow),
a `datasets` folder saved with save_to_disk, a Hugging Face dataset ID or a local dataset
repository folder (streamed, read only as far as the tokens asked for: itda.activations.hub_datasets),
or "default": docstrings of the installed Python standard library, torch and transformers, built
once and cached.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from itda.activations.hub import first_line
from itda.activations.hub_datasets import StreamedDocuments, parse_dataset_spec
from itda.atomic import write_text_atomic
from itda.errors import ItdaInputError

DEFAULT_CONTEXT = 128
MIN_TAIL = 16  # a document's last window is kept when it has at least this many tokens
HELD_OUT_EVERY = 10  # default corpus: documents whose hash % 10 == 0 form the held-out split


# -- documents ---------------------------------------------------------------------------
def read_documents(source: str | Path, field: str = "text") -> Sequence[str]:
    """Documents of a corpus source, in a deterministic order (a streamed dataset: read as indexed)."""
    if str(source) == "default":
        return default_corpus()
    spec = parse_dataset_spec(str(source))
    if spec is not None:
        return StreamedDocuments(spec, field)
    path = Path(source)
    if not path.exists():
        raise ItdaInputError(f"{path}: no such corpus file or folder")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return _read_datasets(path, field)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ItdaInputError(f"{path}: folder holds no .txt files")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ItdaInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or field not in row or not isinstance(row[field], str):
                    raise ItdaInputError(f"{path}:{lineno}: no string field '{field}'")
                docs.append(row[field])
        return docs
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ItdaInputError("reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=[field])
        return [str(t) for t in table.column(field).to_pylist()]
    raise ItdaInputError(
        f"{path}: unsupported corpus type (use .txt, a folder of .txt, .jsonl, .parquet or a datasets folder)"
    )


def _read_datasets(path: Path, field: str) -> list[str]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ItdaInputError("reading a saved dataset needs the 'datasets' package") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow/fsspec errors: one line naming the folder
        raise ItdaInputError(
            f"{path}: not a readable saved dataset ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    if isinstance(ds, DatasetDict):  # take the 'train' split or the first
        ds = ds["train"] if "train" in ds else ds[sorted(ds.keys())[0]]
    if field not in ds.column_names:
        raise ItdaInputError(f"{path}: dataset has no column '{field}' (columns: {', '.join(ds.column_names)})")
    return [str(t) for t in ds[field]]


# -- default corpus ------------------------------------------------------------------------
def _docstring_documents(root: Path, min_chars: int = 300) -> Iterator[str]:
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if "/test" in rel or rel.startswith(("test", "idlelib", "lib2to3", "site-packages")):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def _default_roots() -> list[tuple[str, Path]]:
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for name in ("torch", "transformers"):
        mod = sys.modules.get(name) or __import__(name)
        assert mod.__file__ is not None  # regular packages, not namespace ones
        roots.append((name, Path(mod.__file__).parent))
    return roots


def default_corpus_version() -> str:
    import transformers

    return f"python{sys.version.split()[0]}-torch{torch.__version__}-transformers{transformers.__version__}"


def default_corpus() -> list[str]:
    """Docstrings (>= 300 chars, deduplicated) of the installed stdlib, torch and transformers."""
    from itda.activations.models import cache_root

    cache = cache_root() / "corpus" / f"default-{default_corpus_version()}.jsonl"
    if cache.exists():
        return [json.loads(line)["text"] for line in cache.read_text(encoding="utf-8").splitlines()]
    seen: set[str] = set()
    docs: list[str] = []
    for _label, root in _default_roots():
        for doc in _docstring_documents(root):
            key = hashlib.sha1(doc.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    write_text_atomic(cache, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def split_documents(docs: Sequence[str], split: str) -> list[int]:
    """Indices of the 'train' or 'heldout' documents (by a hash of the text; stable across runs), or 'all'."""
    return list(iter_split(docs, split))


def iter_split(docs: Sequence[str], split: str) -> Iterator[int]:
    """split_documents one index at a time, reading a streamed corpus only as far as it is consumed."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    want = split == "heldout"
    i = 0
    while True:
        try:
            text = docs[i]
        except IndexError:
            return
        if split == "all" or (int(hashlib.sha1(text.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0) == want:
            yield i
        i += 1


# -- tokenization and packing ----------------------------------------------------------------
@dataclass
class Contexts:
    """Packed contexts [n, ctx] with per-token references; padding has token id pad and doc -1."""

    input_ids: torch.Tensor  # [n, ctx] int64
    attention_mask: torch.Tensor  # [n, ctx] int64
    refs: torch.Tensor  # [n, ctx, 5] int64: doc, pos, char_start, char_end, token_id
    special: torch.Tensor  # [n, ctx] bool: special tokens (BOS, EOS, padding)
    fingerprint: str  # tokenizer, context length and documents in order
    documents_fingerprint: str = ""  # documents in order only: equal across tokenizers

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> Contexts:
        """Contexts start..stop (same fingerprint: a view of the same packing)."""
        return Contexts(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.refs[start:stop],
            self.special[start:stop],
            self.fingerprint,
            self.documents_fingerprint,
        )


def tokenize_contexts(
    docs: Sequence[str],
    doc_ids: Iterable[int],
    tokenizer,
    *,
    context: int = DEFAULT_CONTEXT,
    max_tokens: int | None = None,
    tokenizer_name: str = "",
    max_doc_tokens: int | None = None,
) -> Contexts:
    """Split each document into windows of context tokens (a BOS first when the tokenizer has one).

    Windows never span documents; a short last window (>= MIN_TAIL tokens) is right-padded.
    Positions count real tokens within the document from 0. Stops once max_tokens real tokens
    are packed (whole windows); max_doc_tokens keeps each document's first tokens only.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ItdaInputError("character offsets need a fast tokenizer (tokenizers library)")
    if context < 2:
        raise ItdaInputError(f"context must be >= 2 tokens, got {context}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    body = context - (1 if bos is not None else 0)
    rows_ids, rows_refs = [], []
    total = 0
    from itda.activations.models import vocabulary_id  # the vocabulary hash, not the model's name

    cut = f"|first {max_doc_tokens}" if max_doc_tokens is not None else ""
    hasher = hashlib.sha256(f"{vocabulary_id(tokenizer_name)}|{context}|{len(tokenizer)}{cut}".encode())
    doc_hasher = hashlib.sha256()
    for doc_id in doc_ids:
        text = docs[doc_id]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_doc_tokens], enc["offset_mapping"][:max_doc_tokens]
        digest = hashlib.sha1(f"{doc_id}|{text}".encode()).digest()
        hasher.update(digest)
        doc_hasher.update(digest)
        for start in range(0, len(ids), body):
            win = ids[start : start + body]
            if len(win) < MIN_TAIL and start > 0:
                break
            refs = [[doc_id, start + i, offsets[start + i][0], offsets[start + i][1], t] for i, t in enumerate(win)]
            if bos is not None:
                win = [bos] + win
                refs = [[doc_id, -1, -1, -1, bos]] + refs
            total += len(refs)
            pad_n = context - len(win)
            rows_ids.append(win + [pad] * pad_n)
            rows_refs.append(refs + [[-1, -1, -1, -1, pad]] * pad_n)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not rows_ids:
        raise ItdaInputError("the corpus yielded no tokens")
    input_ids = torch.tensor(rows_ids, dtype=torch.int64)
    refs = torch.tensor(rows_refs, dtype=torch.int64)
    mask = (refs[..., 0] >= 0).long()
    special = refs[..., 1] < 0  # the added BOS/CLS and padding; text tokens are never special
    return Contexts(input_ids, mask, refs, special, hasher.hexdigest()[:16], doc_hasher.hexdigest()[:16])


def load_contexts(
    corpus: str | Path,
    tokenizer,
    *,
    tokenizer_name: str,
    split: str = "train",
    tokens: int | None = None,
    context: int = DEFAULT_CONTEXT,
    field: str = "text",
) -> tuple[Sequence[str], Contexts]:
    """Read a corpus, pick a split ('train', 'heldout' or 'all') and pack up to `tokens` tokens.

    The default corpus is split 90/10 by document hash; a user corpus is used whole for 'all',
    and for 'train'/'heldout' split the same way.
    """
    docs = read_documents(corpus, field)
    ids = iter_split(docs, split)
    first = next(ids, None)
    if first is None:
        raise ItdaInputError(f"corpus {corpus}: the '{split}' split is empty ({len(docs)} documents)")
    contexts = tokenize_contexts(
        docs,
        itertools.chain([first], ids),
        tokenizer,
        context=context,
        max_tokens=tokens,
        tokenizer_name=tokenizer_name,
    )
    return (docs.read if isinstance(docs, StreamedDocuments) else docs), contexts
