import pytest

from d2m_export import paths
from d2m_export.sources import corpora
from d2m_export.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """The embedded SmolLM2's tokenizer (built from its GGUF once per session by conftest)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_registry_roles():
    assert corpora.CORPORA["austen"].role == "eval"
    for name in ("brown", "olmo-passages", "calibration"):
        assert corpora.CORPORA[name].role == "train"


def test_unknown_corpus_is_a_user_error():
    with pytest.raises(UserError, match="unknown corpus 'nope'.*austen"):
        corpora.load_text("nope")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("D2M_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    assert paths.assets_dir() == tmp_path / "assets"
    monkeypatch.delenv("D2M_CACHE")
    assert paths.cache_dir().name == "d2m-export"


def test_brown_detokenization_strips_tags():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n\n\n"
        "It/pps urged/vbd (/( again/rb )/) that/cs Atlanta's/np$ laws/nns change/vb ,/, too/rb ./.\n\n\n"
        "Merger/nn-hl proposed/vbn-hl \n\n\n"
        "However/wrb ,/, the/at 1/2/cd vote/nn failed/vbd ?/.\n"
    )
    assert corpora.brown_paragraphs(tagged) == [
        'The jury said "no evidence" was found. It urged (again) that Atlanta\'s laws change, too.',
        "Merger proposed",
        "However, the 1/2 vote failed?",
    ]


def test_brown_text_has_no_tags():
    paras = corpora.paragraphs(corpora.load_text("brown"))
    assert len(paras) > 10_000
    assert paras[0].startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    sample = " ".join(paras[::50])
    assert "/at " not in sample and "/nn" not in sample and "``" not in sample


def test_austen_has_six_novels_in_paragraphs():
    text = corpora.load_text("austen")
    assert text.startswith("SENSE AND SENSIBILITY\n\nby Jane Austen")
    for title in ("PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY", "Persuasion"):
        assert f"\n\n{title}\n\n" in text
    paras = corpora.paragraphs(text)
    assert len(paras) > 9000
    # hard line wraps are joined: a long paragraph stays one paragraph
    assert any(p.startswith("Emma Woodhouse, handsome, clever, and rich") and "little to distress" in p
               for p in paras)


def test_train_and_eval_corpora_are_disjoint():
    corpora.assert_disjoint(["brown", "olmo-passages", "calibration"], ["austen"])
    eval_paras = set(corpora.paragraphs(corpora.load_text("austen")))
    for name in ("brown", "olmo-passages"):
        shared = [p for p in corpora.paragraphs(corpora.load_text(name)) if p in eval_paras and len(p) > 20]
        assert not shared, (name, shared[:3])


def test_disjointness_check_catches_a_leak(monkeypatch):
    leaked = next(p for p in corpora.paragraphs(corpora.load_text("austen")) if len(p) > 100)
    monkeypatch.setitem(corpora.CORPORA, "leaky", corpora.CorpusSpec(
        "train", "test corpus", lambda: f"Something else entirely, long enough to count.\n\n{leaked}"))
    with pytest.raises(ValueError, match="'leaky' shares 1 paragraph"):
        corpora.assert_disjoint(["leaky"], ["austen"])
    with pytest.raises(UserError, match="wrong role"):
        corpora.assert_disjoint(["austen"], ["austen"])


def test_asset_build_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("D2M_CACHE", str(tmp_path))

    def broken(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("network went away")

    with pytest.raises(RuntimeError, match="network went away"):
        corpora._asset("demo", broken)
    assert not (tmp_path / "assets" / "demo").exists()
    assert list((tmp_path / "assets").iterdir()) == []   # no temp folder left behind either

    built = corpora._asset("demo", lambda tmp: (tmp / "ok.txt").write_text("done"))
    assert (built / "ok.txt").read_text() == "done"
    assert corpora._asset("demo", broken) == built          # cached: the builder is not called again


def test_token_windows_are_consecutive(tokenizer):
    text = corpora.load_text("austen")
    windows = corpora.token_windows(tokenizer, text, 64, 300)
    assert windows.shape == (4, 64) and windows.dtype.is_floating_point is False
    full = tokenizer(text[:20_000], add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == full[:256]


def test_token_windows_rejects_too_little(tokenizer):
    with pytest.raises(UserError):
        corpora.token_windows(tokenizer, "a few words", 64, 1000)
    with pytest.raises(UserError):
        corpora.token_windows(tokenizer, corpora.load_text("austen"), 64, 10)
