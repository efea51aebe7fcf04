"""VQA accuracy against the official rule (GT-Vision-Lab/VQA vqaEval.py, master), derived by hand case by case.

The rule, as the official loop applies it to one question:
  1. every human answer and the prediction: newlines/tabs -> spaces, strip;
  2. only if the ten (cleaned) human answers are not all equal: each human answer and the prediction
     -> processDigitArticle(processPunctuation(.)); otherwise nothing more, on either side;
  3. m = number of human answers equal to the prediction. Leaving out a matching answer leaves m-1
     matches, leaving out another leaves m, so
         acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10,
     reported ×100 and rounded to 2 decimals.
`norm(x)` below is step 2's processing, which is what `normalize_answer` computes.
"""

from __future__ import annotations

import random
import time

import pytest

from vlmbatch.evaluation.metrics.vqa import (
    VqaAnnotation,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    score_vqa,
)


def ann(question_id: str, answers: list[str], answer_type: str = "other", question_type: str = "what") -> VqaAnnotation:
    assert len(answers) == 10
    return VqaAnnotation(question_id, answers, answer_type, question_type)


def percent(answers: list[str], prediction: str) -> float:
    """One question scored through the public API, as the official evalQA value (×100, rounded)."""
    return score_vqa([ann("q", answers)], {"q": prediction}).accuracies[0]


# --- Normalization (step 2), one answer at a time ------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    # Number words become digits (manualMap), case folded first: "Two" -> "two" -> "2".
    ("Two", "2"), ("none", "0"), ("ten", "10"),
    # Articles a/an/the are dropped as whole words only: "a dog" -> "dog", "an apple" -> "apple",
    # but "another" stays.
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"), ("another", "another"),
    # Contractions written without apostrophe are restored: "dont" -> "don't", "isnt" -> "isn't".
    ("dont", "don't"), ("Isnt", "isn't"),
    # Trailing period: periodStrip removes "." not followed by a digit -> "yes".
    ("yes.", "yes"),
    # "3.5": the period is followed by a digit, kept. "3.5.": only the last one goes.
    ("3.5", "3.5"), ("3.5.", "3.5"),
    # "1,000": a comma between digits makes every punctuation mark be deleted (not spaced) -> "1000".
    ("1,000", "1000"),
    # "black,white": no digit-comma-digit and no mark touching a space -> "," becomes " " -> "black white".
    ("black,white", "black white"),
    # "black, white": ", " occurs, so "," is deleted -> "black white" (one space, from the original).
    ("black, white", "black white"),
    # "red/white": "/" touches no space -> replaced by " " -> "red white".
    ("red/white", "red white"),
    # "red / white": " /" occurs -> "/" deleted -> "red  white"; split/join in processDigitArticle -> "red white".
    ("red / white", "red white"),
    # Newlines and tabs become spaces, then strip: "\tyes\n" -> "yes".
    ("\tyes\n", "yes"),
    # "?" and "!" are in the list: "yes!" -> "yes " -> split/join -> "yes".
    ("yes!", "yes"),
    # Apostrophes and colons are NOT in the (current) list: "dog's" and "3:00" survive.
    ("dog's", "dog's"), ("3:00", "3:00"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_step_alone():
    # processPunctuation by itself: no lower-casing, no number words, and a deleted " /" leaves two spaces
    # (processDigitArticle's split/join removes them afterwards).
    assert process_punctuation("Two Dogs!") == "Two Dogs "
    assert process_punctuation("red / white") == "red  white"
    assert process_digit_article("The  Two   cats") == "2 cats"


def test_period_strip_removes_at_most_32_periods():
    # Upstream passes re.UNICODE (= 32) as `count` of Pattern.sub: 40 periods -> 8 remain.
    assert process_punctuation("." * 40) == "." * 8


# --- Accuracy per question ------------------------------------------------------------------------------

def test_all_ten_agree_and_match():
    # Unanimous 10 x "2"; pred "2" -> m = 10 -> every subset has 9 matches -> 1 -> 100.
    assert percent(["2"] * 10, "2") == 100.0
    # Step 1 still applies: pred "  2\n" -> "2" -> 100.
    assert percent(["2"] * 10, "  2\n") == 100.0


def test_unanimous_answers_leave_both_sides_unprocessed():
    # Unanimous -> step 2 is skipped for the prediction too: "two" is not turned into "2" ...
    assert percent(["2"] * 10, "two") == 0.0
    # ... so "two" against ten "two" matches (m = 10 -> 100), ...
    assert percent(["two"] * 10, "two") == 100.0
    # ... while case and punctuation count: "Yes" and "yes." against ten "yes" -> m = 0 -> 0.
    assert percent(["yes"] * 10, "Yes") == 0.0
    assert percent(["yes"] * 10, "yes.") == 0.0
    # Agreement is judged after step 1: " yes" (x5) and "yes\t" (x5) both clean to "yes" -> unanimous ->
    # "Yes" stays "Yes" -> 0; "yes" -> 100.
    assert percent([" yes"] * 5 + ["yes\t"] * 5, "Yes") == 0.0
    assert percent([" yes"] * 5 + ["yes\t"] * 5, "yes") == 100.0


def test_disagreeing_answers_normalize_both_sides():
    # Not unanimous -> norm everywhere: "red/white" -> "red white" (x4); pred "red/white" -> "red white";
    # m = 4 -> left-out match: 3 -> 1; others: 4 -> 1 -> acc 1 -> 100.
    answers = ["red/white"] * 4 + ["red and white"] * 3 + ["white"] * 3
    assert percent(answers, "red/white") == 100.0
    # norm("red / white") = "red white" (x3), norm("red") = "red" (x7); pred "Red / White" -> "red white";
    # m = 3 -> (3 * min(1, 2/3) + 7 * min(1, 3/3)) / 10 = (2 + 7) / 10 = 0.9 -> 90.
    answers = ["red / white"] * 3 + ["red"] * 7
    assert percent(answers, "Red / White") == 90.0
    # Number words on both sides: norm("two") = norm("2") = "2" (x10); pred "Two." -> "2"; m = 10 -> 100.
    assert percent(["two"] * 5 + ["2"] * 5, "Two.") == 100.0
    # Articles and contractions: norm("a dog") = "dog" (x6), "dog" (x2), "dogs" (x2); pred "The dog" -> "dog";
    # m = 8 -> 100. And "dont" (x3) / "no" (x7): pred "don't" -> "don't", norm("dont") = "don't"; m = 3 -> 90.
    assert percent(["a dog"] * 6 + ["dog"] * 2 + ["dogs"] * 2, "The dog") == 100.0
    assert percent(["dont"] * 3 + ["no"] * 7, "don't") == 90.0


@pytest.mark.parametrize("matches, expected", [
    # m = 1: left-out match -> 0 matches -> 0; nine others -> 1/3 each: (0 + 9/3) / 10 = 0.3 -> 30.0
    (1, 30.0),
    # m = 2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6 -> 60.0
    (2, 60.0),
    # m = 3: (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9 -> 90.0
    (3, 90.0),
    # m = 4: (4 * 1 + 6 * 1) / 10 = 1 -> 100.0
    (4, 100.0),
    # m = 0 -> 0
    (0, 0.0),
])
def test_leave_one_out_partial_credit(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    if matches in (0, 10):
        answers[-1] = "4"  # keep the ten non-unanimous so the branch under test is the same
    assert percent(answers, "2") == expected


def test_comma_in_number_among_disagreeing_answers():
    # Not unanimous: norm("1,000") = "1000" (digit-comma-digit: "," deleted) (x6); "1000" (x2);
    # norm("one thousand") = "1 thousand" (x2). pred "1,000" -> "1000". m = 8 -> 100.
    answers = ["1,000"] * 6 + ["1000"] * 2 + ["one thousand"] * 2
    assert percent(answers, "1,000") == 100.0


def test_question_accuracy_is_a_fraction():
    # m = 2 as above: 0.6 as a fraction, before the ×100 and rounding.
    assert question_accuracy(["2"] * 2 + ["3"] * 8, "two") == pytest.approx(0.6)


# --- Aggregates -----------------------------------------------------------------------------------------

def test_aggregates_and_rounding_like_the_official_code():
    annotations = [
        ann("1", ["yes"] * 10, "yes/no", "is the"),                 # pred "yes" -> 1.0
        ann("2", ["2"] * 2 + ["3"] * 8, "number", "how many"),     # pred "2"   -> 0.6
        ann("3", ["blue"] * 10, "other", "what color"),            # pred "red" -> 0.0
        ann("4", ["3"] * 10, "number", "how many"),                # no prediction: not scored
    ]
    scores = score_vqa(annotations, {"1": "yes", "2": "2", "3": "red"})
    # overall = round(100 * (1 + 0.6 + 0) / 3, 2) = round(53.333..., 2) = 53.33
    assert scores.overall == 53.33
    assert scores.per_answer_type == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    assert scores.per_question_type == {"is the": 100.0, "how many": 60.0, "what color": 0.0}
    assert scores.question_ids == ["1", "2", "3"]
    assert scores.accuracies == [100.0, 60.0, 0.0]
    assert scores.to_dict() == {"overall": 53.33, "perAnswerType": scores.per_answer_type,
                                "perQuestionType": scores.per_question_type}


def test_no_prediction_at_all_is_an_error():
    with pytest.raises(ValueError):
        score_vqa([ann("1", ["yes"] * 10)], {"other": "yes"})


def test_scores_vqav2_val_sized_input_in_seconds():
    # 214,354 questions (VQAv2 val) with a few thousand distinct, partly punctuated answers.
    rng = random.Random(0)
    vocab = [f"thing{i}" for i in range(3000)] + ["yes", "no", "2", "red/white", "1,000", "a dog", "dont"]
    annotations, predictions = [], {}
    for index in range(214_354):
        base = rng.choice(vocab)
        answers = [base if rng.random() < 0.6 else rng.choice(vocab) + rng.choice(["", ".", "!"]) for _ in range(10)]
        annotations.append(VqaAnnotation(str(index), answers, "other", f"type{index % 65}"))
        predictions[str(index)] = rng.choice([base, base.upper() + ".", "the " + base, "two"])
    start = time.perf_counter()
    scores = score_vqa(annotations, predictions)
    elapsed = time.perf_counter() - start
    assert len(scores.accuracies) == 214_354
    assert elapsed < 20, f"scoring took {elapsed:.1f}s"
