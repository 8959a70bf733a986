"""The atom explorer: usage statistics against a dense float64 recomputation, the page's data
against the dictionary and corpus, and the page itself in headless Chromium."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import sample_docs, saved_model_and_corpus
from typer.testing import CliRunner

from itda.cli.main import app
from itda.dictionary import Dictionary
from itda.explorer.usage import AtomUsageAccumulator, co_occurrence
from itda.pursuit.codes import SparseCodes

runner = CliRunner()


def _random_codes(b, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b, k), generator=g)
    idx[:, 1] = idx[:, 0]  # MP may pick an atom twice: its total counts once
    val = torch.randn(b, k, generator=g)
    return SparseCodes(idx, val, torch.zeros(b))


def test_usage_matches_a_dense_recomputation():
    n, k = 30, 6
    acc = AtomUsageAccumulator(n)
    batches = [_random_codes(40, k, n, s) for s in range(3)]
    for c in batches:
        acc.update(c, torch.rand(c.indices.shape[0]))
    u = acc.result()
    dense = np.zeros((120, n))  # [tokens, atoms] total coefficients, float64
    for bi, c in enumerate(batches):
        for r in range(c.indices.shape[0]):
            for j in range(k):
                dense[bi * 40 + r, int(c.indices[r, j])] += float(c.values[r, j])
    used = dense != 0
    np.testing.assert_array_equal(u.count_N, used.sum(0))
    np.testing.assert_allclose(u.coef_sum_N, dense.sum(0), atol=1e-9)
    np.testing.assert_array_equal(u.l0_T, used.sum(1))
    for a in (0, 7, 29):
        toks, vals = u.top_tokens(a, 3)
        want = np.argsort(-np.where(used[:, a], dense[:, a], -np.inf), kind="stable")[: min(3, used[:, a].sum())]
        np.testing.assert_array_equal(toks, want)
        np.testing.assert_allclose(vals, dense[want, a])
        rows = np.arange(120)
        np.testing.assert_allclose(u.coefficients(a, rows), dense[:, a], atol=1e-12)
    partners, scores = co_occurrence(u, top=4, block=7)  # blocks smaller than N exercise the blocking
    for a in (0, 13):
        inter = (used[:, [a]] & used).sum(0).astype(float)
        jac = inter / (used[:, a].sum() + used.sum(0) - inter)
        jac[a] = -1
        order = np.lexsort((np.arange(n), -jac))[:4]
        np.testing.assert_array_equal(partners[a], order)
        np.testing.assert_allclose(scores[a], jac[order])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny model, a corpus, and dictionaries at two layers built from it with the CLI."""
    root = tmp_path_factory.mktemp("explore")
    model, corpus, docs = saved_model_and_corpus(root, 80, seed=4)
    r = runner.invoke(
        app,
        [
            "build",
            str(model),
            "--layer",
            "1",
            "--layer",
            "2",
            "--corpus",
            str(corpus),
            "--tokens",
            "3000",
            "--context",
            "32",
            "--k",
            "8",
            "--out",
            str(root / "d"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    return {
        "root": root,
        "model": model,
        "corpus": corpus,
        "docs": docs,
        "a": root / "d" / "resid_post.1.safetensors",
        "b": root / "d" / "resid_post.2.safetensors",
    }


def _explore(built, out, *extra):
    return runner.invoke(
        app,
        [
            "explore",
            str(built["a"]),
            *extra,
            "--corpus",
            str(built["corpus"]),
            "--tokens",
            "1500",
            "--context",
            "32",
            "--out",
            str(out),
            "-q",
        ],
    )


@pytest.fixture(scope="module")
def page(built):
    out = built["root"] / "page"
    r = _explore(built, out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def compare_page(built):
    out = built["root"] / "cmp"
    r = _explore(built, out, str(built["b"]))
    assert r.exit_code == 0, r.output
    assert "shared atoms:" in r.output
    return out


def test_page_data_agrees_with_the_dictionary_and_corpus(built, page):
    data = json.loads((page / "data.json").read_text())
    # the page's index holds each card's sort and filter fields; cards/V-C.js the full cards, CHUNK a script
    from itda.explorer.page import CHUNK, INDEX_FIELDS

    js = (page / "data.js").read_text()
    index = json.loads(js.removeprefix("window.ITDA_EXPLORER = ").removesuffix(";\n"))
    assert index["chunk"] == CHUNK
    assert index["views"][0]["atoms"] == [{k: c[k] for k in INDEX_FIELDS} for c in data["views"][0]["atoms"]]
    chunks = sorted((page / "cards").iterdir(), key=lambda p: int(p.stem.split("-")[1]))
    cards = []
    for i, path in enumerate(chunks):
        head = f"window.ITDA_CARDS(0, {i}, "
        text = path.read_text()
        assert path.name == f"0-{i}.js" and text.startswith(head) and text.endswith(");\n")
        cards += json.loads(text[len(head) : -3])
    atoms = data["views"][0]["atoms"]
    assert cards == sorted(atoms, key=lambda c: (-c["uses"], c["id"]))  # the default order: the first page, one script
    # text/V-C.js: the same chunks' search text alone (source, then contexts, lowercased), what text search loads
    lines = []
    for i in range(len(chunks)):
        head = f"window.ITDA_TEXT(0, {i}, "
        text = (page / "text" / f"0-{i}.js").read_text()
        assert text.startswith(head) and text.endswith(");\n")
        lines += json.loads(text[len(head) : -3])
    assert len(list((page / "text").iterdir())) == len(chunks)
    want = [
        "\x01".join([(c["source"] or {}).get("text", ""), *(x["text"] for x in c["contexts"])]).lower() for c in cards
    ]
    assert lines == want
    assert [c["id"] for c in atoms] == list(range(len(atoms)))
    d = Dictionary.load(built["a"])
    (view,) = data["views"]
    assert len(view["atoms"]) == len(d)
    docs = built["docs"]
    for card, (doc, pos, cs, ce, tok) in zip(view["atoms"], d.refs.tolist(), strict=True):
        assert (card["doc"], card["pos"], card["token_id"]) == (doc, pos, tok)
        assert card["token"] == docs[doc][cs:ce]
        src = card["source"]
        assert src["text"][src["hl"][0] : src["hl"][1]] == docs[doc][cs:ce]
        for ctx in card["contexts"]:
            s, e, coef = ctx["spans"][3 * ctx["at"] : 3 * ctx["at"] + 3]
            assert coef != 0 and ctx["text"][s:e].strip()
        coefs = [c["spans"][3 * c["at"] + 2] for c in card["contexts"]]
        assert coefs == sorted(coefs, reverse=True)  # strongest first
        assert sum(card["hist"]["counts"]) == card["uses"]  # every use of the atom in its histogram
        ups, downs = [v for _, v in card["logits"]["up"]], [v for _, v in card["logits"]["down"]]
        assert ups == sorted(ups, reverse=True) and downs == sorted(downs) and ups[0] > downs[0]
    s = view["summary"]
    uses = sum(c["uses"] for c in view["atoms"])
    assert uses == pytest.approx(s["mean_l0"] * s["tokens"])  # every token's distinct atoms, counted per atom
    assert sum(s["usage_hist"]["counts"]) + s["usage_hist"]["zeros"] == len(d)
    assert sum(s["cos_hist"]["counts"]) == s["tokens"] and sum(s["l0_hist"]["counts"]) == s["tokens"]


def test_compare_page_pairs_atoms_of_the_same_token(built, compare_page):
    data = json.loads((compare_page / "data.json").read_text())
    a, b = Dictionary.load(built["a"]), Dictionary.load(built["b"])
    keys_a = {tuple(r[i] for i in (0, 2, 3)) for r in a.refs.tolist()}
    keys_b = {tuple(r[i] for i in (0, 2, 3)) for r in b.refs.tolist()}
    assert len(data["shared"]) == len(keys_a & keys_b) > 0
    for i, j in data["shared"]:
        ra, rb = a.refs[i].tolist(), b.refs[j].tolist()
        assert (ra[0], ra[2], ra[3]) == (rb[0], rb[2], rb[3])


def test_bad_inputs_give_one_line(built, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(80, seed=9)))
    r = runner.invoke(
        app,
        [
            "explore",
            str(built["a"]),
            "--corpus",
            str(other),
            "--tokens",
            "500",
            "--context",
            "32",
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert r.exit_code == 2 and "not the corpus" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "p").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    r = _explore(built, keep)
    assert r.exit_code == 2 and "exists and is not an explorer folder" in r.output
    assert (keep / "notes.txt").read_text() == "precious" and len(list(keep.iterdir())) == 1
    again = tmp_path / "again"
    assert _explore(built, again).exit_code == 0
    assert _explore(built, again).exit_code == 0  # an earlier explorer output is replaced
    r = runner.invoke(app, ["explore", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "no such file" in r.output


# -- in a real browser --------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (make test installs Debian's chromium where apt-get can)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    exe = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _shows(tab, search="", token="", show="all", sort="uses-desc") -> None:
    """Wait until the page has applied this query (body[data-query] is set after each update)."""
    tab.wait_for_function("q => document.body.dataset.query === q", arg="|".join([search, token, show, sort]))


def _open(browser, folder: Path):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((folder / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page, errors


def test_page_in_a_browser(browser, built, page):
    _check_page(browser, built, page)


def test_page_in_a_browser_loads_cards_chunk_by_chunk(browser, built, page, tmp_path, monkeypatch):
    """The same page written 7 cards a script: sorting, search, #id and paging load the chunks they show."""
    import itda.explorer.page as explorer_page

    monkeypatch.setattr(explorer_page, "CHUNK", 7)
    small = tmp_path / "small"
    explorer_page.write_explorer(small, json.loads((page / "data.json").read_text()))
    n = len(json.loads((page / "data.json").read_text())["views"][0]["atoms"])
    assert len(list((small / "cards").iterdir())) == -(-n // 7) > 2
    _check_page(browser, built, small)


def _check_page(browser, built, page):
    d = Dictionary.load(built["a"])
    data = json.loads((page / "data.json").read_text())
    tab, errors = _open(browser, page)
    n = len(d)
    assert tab.locator(".card").count() == min(50, n)
    assert tab.inner_text("#count").startswith(f"{n} of {n}")
    # the highlighted token of every shown card is the token its refs name
    docs = built["docs"]
    for card in tab.locator(".card").all():
        atom = int(card.get_attribute("data-atom"))
        doc, pos, cs, ce, _ = d.refs[atom].tolist()
        mark = card.locator("mark.atom-token")
        assert mark.inner_text() == docs[doc][cs:ce]
        assert (int(mark.get_attribute("data-doc")), int(mark.get_attribute("data-pos"))) == (doc, pos)
    # every card's histogram and direct logit effects (a causal LM): the promoted tokens' text
    first = tab.locator(".card").first
    cardata = data["views"][0]["atoms"][int(first.get_attribute("data-atom"))]
    assert first.locator(".hist i").count() == len(cardata["hist"]["counts"])
    shown = first.locator(".logits.up span.lt").all_inner_texts()
    assert len(shown) == len(cardata["logits"]["up"]) and first.locator(".logits.down span.lt").count() > 0
    # default order is most used first
    uses = [data["views"][0]["atoms"][int(c.get_attribute("data-atom"))]["uses"] for c in tab.locator(".card").all()]
    assert uses == sorted(uses, reverse=True)
    # search by text narrows the cards to those whose contexts contain it
    word = data["views"][0]["atoms"][0]["token"].strip()
    want = sum(
        1
        for c in data["views"][0]["atoms"]
        if word.lower()
        in ((c["source"] or {}).get("text", "") + "\x01" + "\x01".join(x["text"] for x in c["contexts"])).lower()
    )
    tab.fill("#search", word)
    _shows(tab, search=word)
    assert tab.inner_text("#count").startswith(f"{want} of")
    # search by token: exactly the atoms taken from that token
    tab.fill("#search", "")
    tab.fill("#token", word)
    want_tok = sum(1 for c in data["views"][0]["atoms"] if c["token"].strip().lower() == word.lower())
    _shows(tab, token=word)
    assert tab.inner_text("#count").startswith(f"{want_tok} of")
    assert all(
        c.locator(".token-name").inner_text().strip("\u201c\u201d").strip().lower() == word.lower()
        for c in tab.locator(".card").all()
    )
    # an atom id, and the second page
    tab.fill("#token", "")
    tab.fill("#search", "#3")
    _shows(tab, search="#3")
    assert tab.inner_text("#count").startswith("1 of")
    assert tab.locator(".card").first.get_attribute("data-atom") == "3"
    tab.fill("#search", "")
    _shows(tab)
    assert tab.inner_text("#count").startswith(f"{n} of")
    if n > 50:
        tab.click("#next")  # the next page may need card scripts not loaded yet: wait until it is drawn
        tab.wait_for_function("document.getElementById('page').textContent.includes('page 2 of')")
        assert tab.locator(".card").count() == n - 50
    tab.screenshot(path=str(page / "screenshot.png"))
    assert errors == []


def test_compare_page_in_a_browser(browser, compare_page):
    data = json.loads((compare_page / "data.json").read_text())
    tab, errors = _open(browser, compare_page)
    n_shared = len(data["shared"])
    n_rows = n_shared + (len(data["views"][0]["atoms"]) - n_shared) + (len(data["views"][1]["atoms"]) - n_shared)
    assert tab.inner_text("#count").startswith(f"{n_rows} of {n_rows}")
    tab.select_option("#filter", "shared")
    _shows(tab, show="shared")
    assert tab.inner_text("#count").startswith(f"{n_shared} of")
    row = tab.locator(".row").first
    assert row.locator(".card").count() == 2 and row.get_attribute("data-kind") == "shared"
    tab.select_option("#filter", "only-b")
    only_b = len(data["views"][1]["atoms"]) - n_shared
    _shows(tab, show="only-b")
    assert tab.inner_text("#count").startswith(f"{only_b} of")
    if only_b:
        assert tab.locator(".row").first.locator(".card.empty").count() == 1
    assert errors == []


@pytest.mark.slow
def test_explorer_on_smollm2_highlights_the_bpe_tokens(smollm2, smollm2_contexts):
    """On a real BPE tokenizer (leading spaces, sub-words) the highlighted source span is the
    token the refs name, and held-out contexts highlight the token they were chosen for."""
    from itda.activations.hookpoints import Hookpoint
    from itda.builder import BuildConfig
    from itda.builder.from_model import build_from_model
    from itda.explorer.run import view_on_model

    docs, ctx = smollm2_contexts
    hp = Hookpoint("resid_post", 6)
    d = build_from_model(
        smollm2, [hp], ctx, BuildConfig(k=40, min_cosine=0.85), corpus_name="default", progress=False
    ).dictionaries[hp]
    view = view_on_model(d, label="smollm2", lm=smollm2, tokens=1024, contexts=3, progress=False)
    tok = smollm2.tokenizer
    assert len(view["atoms"]) == len(d) and view["summary"]["tokens"] >= 900
    for card, (doc, _pos, cs, ce, tid) in zip(view["atoms"], d.refs.tolist(), strict=True):
        if doc < 0:
            continue
        src = card["source"]
        shown = src["text"][src["hl"][0] : src["hl"][1]]
        assert shown == docs[doc][cs:ce] == card["token"]
        assert tok.decode([tid]).strip() == shown.strip()  # the span is that token's text
        for c in card["contexts"]:
            s, e, coef = c["spans"][3 * c["at"] : 3 * c["at"] + 3]
            assert coef != 0 and c["text"][s:e]


@pytest.fixture(scope="module")
def sae_page(built):
    """An SAE trained on the tiny model's layer 1, explored on the same corpus."""
    import itda

    root = built["root"]
    itda.train_sae(
        model=str(built["model"]),
        layer=1,
        corpus=str(built["corpus"]),
        latents=40,
        k=4,
        steps=4,
        batch_size=128,
        init="data",
        init_sample=256,
        context=32,
        progress=False,
        out=root / "sae.safetensors",
    )
    out = root / "sae_page"
    r = runner.invoke(
        app,
        [
            "explore",
            str(root / "sae.safetensors"),
            "--corpus",
            str(built["corpus"]),
            "--tokens",
            "1500",
            "--context",
            "32",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "40 latents" in r.output
    return out


def test_sae_cards_count_the_latents_the_sae_fires(built, sae_page):
    """Per latent, its uses on the held-out tokens against the SAE's TopK rule written out here."""
    from itda.activations.corpus import read_documents, split_documents, tokenize_contexts
    from itda.activations.hookpoints import Hookpoint
    from itda.activations.models import load_model
    from itda.activations.stream import iterate_batches
    from itda.sae.io import load_sae

    loaded = load_sae(built["root"] / "sae.safetensors")
    lm = load_model(str(built["model"]), device="cpu")
    docs = read_documents(str(built["corpus"]), "text")
    ids = split_documents(docs, "heldout") or split_documents(docs, "all")
    ctx = tokenize_contexts(docs, ids, lm.tokenizer, context=32, max_tokens=1500, tokenizer_name=lm.tokenizer_name)
    hp = Hookpoint("resid_post", 1)
    x = torch.cat([b[hp].dense() for b in iterate_batches(lm.model, [hp], ctx, dtype=torch.float32)]).double()
    s = loaded.sae
    pre = torch.relu((x - s.b_dec.double()) @ s.W_enc.double().T + s.b_enc.double())
    top = pre.topk(4, dim=1)
    fired = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top.indices, top.values > 0)
    view = json.loads((sae_page / "data.json").read_text())["views"][0]
    assert view["kind"] == "sae" and len(view["atoms"]) == 40 and view["summary"]["tokens"] == len(x)
    assert [c["uses"] for c in view["atoms"]] == fired.sum(0).tolist()
    for c in view["atoms"]:
        assert sum(c["hist"]["counts"]) == c["uses"] and c["source"] is None and "up" in c["logits"]


def test_sae_page_in_a_browser(browser, sae_page):
    tab, errors = _open(browser, sae_page)
    first = tab.locator(".card").first
    assert "sae latent" in first.inner_text().lower() and first.locator(".logits.up span.lt").count() > 0
    assert first.locator(".token-name").count() == 0  # a latent has no source token
    assert errors == []
