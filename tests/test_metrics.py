"""Caption and VQA metrics checked against hand computations and independent re-derivations."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from vpgtrans.errors import VpgtransError
from vpgtrans.metrics import caption_scores, normalize_answer, normalize_caption, vqa_accuracy, vqa_scores

# --- caption normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs, playing in the snow!", "two dogs playing in the snow"),
    ("The dog's ball", "the dog 's ball"),
    ("It isn't (really) red; is it?", "it is n't really red is it"),
    ('a "vintage" car...', "a vintage car"),
    ("a t-shirt - nice -- very", "a t-shirt nice very"),
    ("3.5 inches, 2,000 people: 10.", "3.5 inches 2,000 people 10"),
    ("  a \n dog\tsits  ", "a dog sits"),
    ("'quoted' words and dogs' bowls", "quoted words and dogs bowls"),
    ("I cannot see it", "i can not see it"),
    ("$5 or 50%", "$ 5 or 50 %"),
    ("", ""),
    ("?!...", ""),
])
def test_normalize_caption(text, expected):
    assert normalize_caption(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii") | st.sampled_from("’‘“”…"), max_size=40))
def test_normalize_caption_leaves_no_coco_punctuation_token(text):
    out = normalize_caption(text)
    assert out == " ".join(out.split())  # single spaces, no edge whitespace
    assert not set(out.split()) & {p.lower() for p in PUNCTUATIONS}
    assert out == out.lower() and normalize_caption(out) == out


# --- BLEU ----------------------------------------------------------------------------------------------

# Two images; pycocoevalcap's BLEU is corpus-level with the "closest" reference length per sentence.
BLEU_PREDICTIONS = ["A small dog runs on the grass.", "a cat sits on a mat"]
BLEU_REFERENCES = [["A small dog runs on green grass.", "The dog is running on the grass outside"],
                   ["a black cat sits on a red mat", "the cat is sitting on the mat"]]


def test_bleu_matches_a_hand_computation():
    # Image 0, hypothesis "a small dog runs on the grass" (7 words), closest reference length 7.
    #   1-grams 7/7; 2-grams 6/6; 3-grams 4/5 ("runs on the" unmatched); 4-grams 2/4.
    # Image 1, hypothesis "a cat sits on a mat" (6 words), references of 8 and 7 words -> closest 7.
    #   1-grams 6/6 ("a" twice, clipped at 2); 2-grams 3/5 ("a cat", "a mat" unmatched); 3-grams 2/4; 4-grams 1/3.
    # Corpus: c = 13, r = 14 -> brevity penalty exp(1 - 14/13).
    p = [13 / 13, 9 / 11, 6 / 9, 3 / 7]
    brevity = math.exp(1 - 14 / 13)
    scores = caption_scores(BLEU_PREDICTIONS, BLEU_REFERENCES)
    assert scores["bleu1"] == pytest.approx(brevity * p[0], abs=1e-6)
    assert scores["bleu4"] == pytest.approx(brevity * math.prod(p) ** 0.25, abs=1e-6)
    assert scores["n"] == 2


def _bleu_by_definition(predictions: list[str], references: list[list[str]], order: int) -> float:
    """Corpus BLEU from the definition: clipped n-gram precision, closest-length brevity penalty."""
    correct, guess, hyp_len, ref_len = [0] * order, [0] * order, 0, 0
    for prediction, refs in zip(predictions, references):
        hyp, refs = prediction.split(), [r.split() for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]  # ties -> the shorter reference
        for n in range(1, order + 1):
            grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            most = Counter()
            for r in refs:
                most |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(count, most[g]) for g, count in grams.items())
            guess[n - 1] += sum(grams.values())
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.prod(c / g for c, g in zip(correct, guess)) ** (1 / order)


@pytest.mark.parametrize("predictions, references", [
    (BLEU_PREDICTIONS, BLEU_REFERENCES),
    # Length tie (5 and 7 around 6): the shorter reference wins, so no brevity penalty here.
    (["the the big red bus stops", "a bird on a wire over water"],
     [["the big red bus stops", "a big red bus stops at the stop"], ["a bird on a wire", "one bird sits on the wire"]]),
])
def test_bleu_matches_the_definition(predictions, references):
    normalised = [[normalize_caption(r) for r in refs] for refs in references]
    scores = caption_scores(predictions, references)
    hyps = [normalize_caption(p) for p in predictions]
    assert scores["bleu1"] == pytest.approx(_bleu_by_definition(hyps, normalised, 1), abs=1e-6)
    assert scores["bleu4"] == pytest.approx(_bleu_by_definition(hyps, normalised, 4), abs=1e-6)


# --- CIDEr-D -------------------------------------------------------------------------------------------

def test_cider_matches_a_hand_computation():
    # Two images, one reference each; every n-gram occurs in one image only -> idf = log(2) = L for all.
    # Image 1 ("cat sits" for "cat sits"): cosine 1 for 1- and 2-grams, no 3-/4-grams -> 10 * 2/4 = 5.
    # Image 0 ("dog" for "dog runs"): 1-grams cos = L*L / (L * L*sqrt(2)) = 1/sqrt(2), length penalty
    # exp(-1^2 / (2 * 6^2)); no 2-grams in the hypothesis -> 10 * (1/sqrt(2)) * exp(-1/72) / 4.
    image0 = 10 * math.exp(-1 / 72) / math.sqrt(2) / 4
    scores = caption_scores(["Dog.", "cat sits"], [["dog runs"], ["Cat sits!"]])
    assert scores["cider"] == pytest.approx((image0 + 5.0) / 2, abs=1e-9)


def _cider_d_by_definition(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D: 10 x mean over n = 1..4 of the clipped tf-idf cosine with a Gaussian length penalty,
    averaged over references; idf = log(#images) - log(max(1, #images whose references hold the n-gram))."""
    def grams(words, n):
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    refs_words = [[r.split() for r in refs] for refs in references]
    df = Counter(g for refs in refs_words for g in {g for r in refs for n in range(1, 5) for g in grams(r, n)})
    log_images = math.log(len(references))

    def tfidf(words, n):
        return {g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in grams(words, n).items()}

    total = 0.0
    for prediction, refs in zip(predictions, refs_words):
        hyp = prediction.split()
        per_ref = []
        for ref in refs:
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
            sims = []
            for n in range(1, 5):
                h, r = tfidf(hyp, n), tfidf(ref, n)
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in h.items())
                norms = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
                sims.append(penalty * (dot / norms if norms else dot))
            per_ref.append(sum(sims) / 4)
        total += 10 * sum(per_ref) / len(per_ref)
    return total / len(predictions)


CORPUS_REFERENCES = [
    ["a dog runs on the grass", "a brown dog is running on the grass", "the dog runs on a green lawn"],
    ["a cat sits on a red mat", "a cat is sitting on the mat", "the black cat on a mat"],
    ["two birds fly over the water", "birds flying over the lake", "two white birds over the water"],
    ["a man rides a red bike", "a man riding a bicycle on the road", "the man rides his bike down the road"],
]
CORPUS_PREDICTIONS = ["a dog runs on the grass", "a cat on a mat", "birds birds birds over water",
                      "a man rides a bike on the road"]


def test_cider_matches_the_definition():
    scores = caption_scores(CORPUS_PREDICTIONS, CORPUS_REFERENCES)
    assert scores["cider"] == pytest.approx(_cider_d_by_definition(CORPUS_PREDICTIONS, CORPUS_REFERENCES), abs=1e-9)


def test_right_captions_beat_shuffled_ones():
    right = [refs[0] for refs in CORPUS_REFERENCES]
    shuffled = right[1:] + right[:1]
    good, bad = caption_scores(right, CORPUS_REFERENCES), caption_scores(shuffled, CORPUS_REFERENCES)
    assert good["cider"] > bad["cider"] and good["bleu4"] > bad["bleu4"] and good["bleu1"] > bad["bleu1"]


def test_scores_equal_pycocoevalcap_on_hand_tokenised_text(capsys):
    raw_predictions = ["A Dog runs, on the grass!", "A cat (on a mat).", "Birds... over the water?", "A man's bike"]
    tokenised = ["a dog runs on the grass", "a cat on a mat", "birds over the water", "a man 's bike"]
    raw_references = [[r.capitalize() + "." for r in refs] for refs in CORPUS_REFERENCES]
    scores = caption_scores(raw_predictions, raw_references)
    gts = dict(enumerate(CORPUS_REFERENCES))
    res = {i: [t] for i, t in enumerate(tokenised)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert scores["bleu1"] == pytest.approx(bleu[0]) and scores["bleu4"] == pytest.approx(bleu[3])
    assert scores["cider"] == pytest.approx(cider)
    assert capsys.readouterr().out == ""  # Bleu's own printing is silenced


def test_empty_predictions_score_without_error():
    predictions = ["", "a cat on a mat", "...", "a man rides a bike on the road"]
    scores = caption_scores(predictions, CORPUS_REFERENCES)
    assert scores["cider"] == pytest.approx(_cider_d_by_definition([normalize_caption(p) for p in predictions],
                                                                   CORPUS_REFERENCES), abs=1e-9)
    assert 0 < scores["bleu1"] < caption_scores(CORPUS_PREDICTIONS, CORPUS_REFERENCES)["bleu1"]
    nothing = caption_scores([""] * 4, CORPUS_REFERENCES)
    assert nothing["cider"] == 0.0 and nothing["bleu4"] == 0.0 and nothing["bleu1"] == 0.0


# --- VQA -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("ten", "10"), ("none", "0"),
    ("the dog.", "dog"), ("An apple", "apple"), ("  A  Cat ", "cat"),
    ("dont", "don't"), ("whats that?", "what's that"), ("isnt", "isn't"), ("well", "well"),
    ("2,000", "2000"), ("3.5", "3.5"), ("5.", "5"),
    ("Black-and-White", "black and white"), ("yes!", "yes"),
    ("on the left, near a tree", "on left near tree"), ("red/white", "red white"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """The official definition: mean over the n subsets of n-1 answers of min(1, matches / 3)."""
    guess = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in answers]
    subsets = list(itertools.combinations(gold, len(gold) - 1))
    return sum(min(1.0, sum(a == guess for a in subset) / 3) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_ten_answers(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("Cat", answers) == pytest.approx(expected)
    assert vqa_accuracy("Cat", answers) == pytest.approx(_leave_one_out("Cat", answers))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["two", "2", "the cat", "cat", "dog", "yes"]), min_size=2, max_size=10),
       st.sampled_from(["2", "cat", "Dog.", "no"]))
def test_vqa_accuracy_is_the_leave_one_out_average(answers, prediction):
    assert vqa_accuracy(prediction, answers) == pytest.approx(_leave_one_out(prediction, answers))


def test_vqa_accuracy_with_few_answers():
    assert vqa_accuracy("cat", ["cat", "cat", "cat"]) == pytest.approx(2 / 3)  # best possible with 3 answers
    assert vqa_accuracy("The cat.", ["cat"]) == 1.0  # one answer: exact match
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_vqa_scores():
    predictions = ["two", "dog", "bird", "Yes"]
    answers = [["2"] * 10,
               ["cat", "cat", "dog", "dog", "bird"],  # tie between cat and dog: either counts as exact
               ["cat", "cat", "dog", "dog", "bird"],
               ["no"] * 7 + ["yes"] * 3]
    scores = vqa_scores(predictions, answers)
    expected_accuracy = sum(_leave_one_out(p, a) for p, a in zip(predictions, answers)) / 4
    assert scores == {"vqa_accuracy": pytest.approx(expected_accuracy), "exact_match": 0.5, "n": 4}
    assert 0.0 <= scores["vqa_accuracy"] <= 1.0


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", [caption_scores, vqa_scores])
@pytest.mark.parametrize("predictions, references, message", [
    (["a"], [["a"], ["b"]], "1 predictions but 2"),
    ([], [], "empty"),
    (["a", "b"], [["a"], []], "sample(s) 1"),
    (["a", "b"], ["a", ["b"]], "not a list"),
    ([None], [["a"]], "not strings"),
])
def test_bad_input_raises(score, predictions, references, message):
    with pytest.raises(VpgtransError, match=message.replace("(", r"\(").replace(")", r"\)")):
        score(predictions, references)


def test_reference_captions_without_words_are_refused():
    with pytest.raises(VpgtransError, match="any words"):
        caption_scores(["a dog", "a cat"], [["a dog"], ["...", ""]])


def test_vqa_accuracy_needs_answers():
    with pytest.raises(VpgtransError):
        vqa_accuracy("cat", [])


def test_ptb_tokenizer_is_cocos_and_needs_java(monkeypatch):
    import shutil

    from vpgtrans.errors import VpgtransError
    from vpgtrans.metrics import caption_scores

    predictions = ["A dog's toy, red!", "two cats on a mat."]
    references = [["a dog 's red toy", "the dog's toy is red"], ["Two cats sit on a mat", "cats on the mat"]]
    if shutil.which("java"):
        from vpgtrans.metrics import ptb_tokenize

        ptb = caption_scores(predictions, references, tokenizer="ptb")
        regex = caption_scores(predictions, references)
        # On plain captions the Java-free tokenisation matches COCO's PTB one, so the scores agree ...
        assert ptb == pytest.approx(regex, abs=1e-9)
        # ... but COCO's pipeline lower-cases before it drops "-LRB-" / "-RRB-", so brackets stay as tokens there.
        assert ptb_tokenize({0: ["a toy (red)"]}) == {0: ["a toy -lrb- red -rrb-"]}
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(VpgtransError, match="--tokenizer ptb .* needs Java"):
        caption_scores(predictions, references, tokenizer="ptb")
    with pytest.raises(VpgtransError, match="--tokenizer must be one of regex, ptb"):
        caption_scores(predictions, references, tokenizer="nltk")
