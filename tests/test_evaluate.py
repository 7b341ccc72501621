"""The evaluation metrics (RECIPE §2.9): exact match after normalisation, and DocVQA's ANLS."""
import pytest

from phi3v.evaluate import anls, levenshtein, normalize, score


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3),
                                     ("flaw", "lawn", 2), ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein_known_distances(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_normalize_strips_spaces_periods_and_case():
    assert normalize("  Yes. ") == "yes"
    assert normalize("...BabyCrawling..") == "babycrawling"
    assert normalize("a.b") == "a.b"                      # only leading/trailing periods go
    assert normalize(" . no") == " no"                     # spaces, then periods: one pass each


def test_anls_formula():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("hallo", ["hello"]) == pytest.approx(1 - 1 / 5)          # NL = 1/5 < 0.5
    assert anls("hxxxo", ["hello"]) == 0.0                                # NL = 3/5 >= 0.5 scores 0
    assert anls("abcd", ["abcx", "zzzz"]) == pytest.approx(0.75)          # best over the references
    assert anls(" 42. ", ["42"]) == 1.0                                  # the prediction is stripped
    assert anls("Hello", ["hello"]) == pytest.approx(0.8)                 # no lowercasing (the recipe's)
    assert anls("", ["x"]) == 0.0 and anls(" . ", ["x"]) == 0.0           # empty prediction
    assert anls("ab", ["abcd"]) == 0.0                                   # NL exactly 0.5: not < tau


def test_score_accuracy_and_anls():
    results = [{"prediction": "Yes.", "answers": ["yes"]},
               {"prediction": "no", "answers": ["maybe", "No"]},
               {"prediction": "cat", "answers": ["dog"]},
               {"prediction": "hallo", "answers": ["hello"]}]
    out = score(results, with_anls=True)
    assert out["n"] == 4 and out["accuracy"] == pytest.approx(2 / 4)
    # ANLS is case-sensitive: "Yes" vs "yes" is 1 edit in 3 (2/3); "no" vs "No" is NL 0.5, which scores 0
    assert out["anls"] == pytest.approx((2 / 3 + 0 + 0 + 0.8) / 4)
    assert "anls" not in score(results)
    assert score([]) == {"accuracy": 0.0, "n": 0}
