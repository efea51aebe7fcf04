"""VQA accuracy by the official rule of the VQA evaluation code (GT-Vision-Lab/VQA, vqaEval.py, master),
quirks included, because published VQAv2 numbers come from that code: newlines and tabs become spaces;
only when the ten human answers disagree are the answers and the prediction put through punctuation and
digit/article processing (so "Yes." does not match ten "yes"); a question's accuracy is the mean over
the ten leave-one-out subsets of nine answers of min(1, matches / 3); numbers are x100 and rounded to 2
decimals, per question and in aggregate. Normalization is memoized: answers repeat a lot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

#: Digits of the rounding the official code applies (its `n=2`).
ROUND_DIGITS = 2

# --- The official tables, value for value -------------------------------------------------------------

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

ARTICLES = frozenset({"a", "an", "the"})

# Keys as the official table has them; the capitalised ones ("Im", "Ive", ...) can never match because
# words are lower-cased first, and "somebody'd" maps *to* "somebodyd" -- both kept, since the rule is theirs.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# The official period regex is "(?!<=\d)(\.)(?!\d)": its first group is a *lookahead* for the text "<=" and a
# digit (a typo for a lookbehind), which can never match right before a ".", so in effect it removes every
# period not followed by a digit. Kept verbatim rather than "fixed".
# Upstream ran on Python 2, where `\d` without the UNICODE flag means [0-9] only: hence re.ASCII.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# The official code passes re.UNICODE as the third positional argument of `Pattern.sub`, which is `count`:
# at most re.UNICODE (= 32) periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)", re.ASCII)
# Text with none of these characters passes punctuation processing unchanged (fast path).
_NEEDS_PUNCTUATION_PASS = re.compile("[" + re.escape("".join(PUNCTUATION) + ".") + "]")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    A punctuation mark is deleted when it touches a space somewhere in the text, or whenever the text has a
    comma between digits ("1,000"); otherwise it becomes a space. Then periods not followed by a digit go.
    """
    if not _NEEDS_PUNCTUATION_PASS.search(text):
        return text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test looks at the original text, the replacement works on the running result, as upstream.
        if strip_all or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: done to every answer, human or predicted."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 18)
def normalize_answer(text: str) -> str:
    """An answer as the official code compares it when the human answers disagree."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


@dataclass(frozen=True)
class VqaAnnotation:
    """The ground truth of one question: its human answers (ten in VQAv2) and its two type labels."""

    question_id: str
    answers: Sequence[str]
    answer_type: str
    question_type: str


@dataclass
class VqaScores:
    """Official-style accuracies (×100, rounded) for the questions that had a prediction.

    `question_ids`, `predictions` and `accuracies` are aligned per question; `accuracies` holds what the
    official code stores in `evalQA` (×100, rounded), `overall` and the per-type maps what it stores in
    `accuracy`.
    """

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    question_ids: list[str]
    predictions: list[str]
    accuracies: list[float]

    def to_dict(self) -> dict[str, object]:
        """The official `accuracy` dict, keyed as the official code keys it."""
        return {"overall": self.overall, "perAnswerType": self.per_answer_type,
                "perQuestionType": self.per_question_type}


def question_accuracy(answers: Sequence[str], prediction: str) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers, by the official rule."""
    answers = [clean_whitespace(answer) for answer in answers]
    predicted = clean_whitespace(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(answer) for answer in answers]
        predicted = normalize_answer(predicted)
    hits = [answer == predicted for answer in answers]
    matches = sum(hits)
    # Leave each human answer out in turn; the others match `matches - hit` times. Summing a list in order
    # (not a closed form) keeps the float result bit-identical to the official loop.
    return float(sum([min(1, float(matches - hit) / 3) for hit in hits])) / len(hits)


def _percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), ROUND_DIGITS)


def score_vqa(annotations: Sequence[VqaAnnotation], predictions: Mapping[str, str]) -> VqaScores:
    """Score the annotated questions that have a prediction, in annotation order.

    Questions without a prediction are left out (the caller reports coverage); `predictions` maps
    question id to the model's answer.
    """
    scored = [annotation for annotation in annotations if annotation.question_id in predictions]
    if not scored:
        raise ValueError("no annotated question has a prediction")
    accuracies: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for annotation in scored:
        accuracy = question_accuracy(annotation.answers, predictions[annotation.question_id])
        accuracies.append(accuracy)
        by_answer_type.setdefault(annotation.answer_type, []).append(accuracy)
        by_question_type.setdefault(annotation.question_type, []).append(accuracy)
    return VqaScores(
        overall=_percent(accuracies),
        per_answer_type={kind: _percent(values) for kind, values in by_answer_type.items()},
        per_question_type={kind: _percent(values) for kind, values in by_question_type.items()},
        question_ids=[annotation.question_id for annotation in scored],
        predictions=[predictions[annotation.question_id] for annotation in scored],
        accuracies=[round(100 * accuracy, ROUND_DIGITS) for accuracy in accuracies],
    )
