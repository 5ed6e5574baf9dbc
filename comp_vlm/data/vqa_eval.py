"""VQA accuracy as the official VQAv2 evaluation computes it (``vqaEval.py`` of GT-Vision-Lab/VQA, the version
distributed with VQAv2), quirks included, so numbers compare with published ones.

- A predicted answer is normalised: newlines and tabs become spaces, the ends are stripped, then
  :func:`process_punctuation` and :func:`process_digit_article` (lower case, number words to digits, articles
  dropped, contractions restored: ``"dont"`` -> ``"don't"``).
- The human answers are compared as stored, except that when they are not all the same their punctuation is
  processed too (never their digits or articles).
- Accuracy = the mean, over the ten ways of leaving one human answer out, of ``min(1, #matching others / 3)``:
  an answer given by three or more of the ten humans scores 1, by two 0.6, by one 0.3.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..errors import DataError
from .vqav2 import VQAQuestion

_CONTRACTION_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've
youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
"""
#: the official contraction table (keys with capitals never match: the text is lower-cased first)
CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in _CONTRACTION_TABLE.split())
NUMBER_WORDS: dict[str, str] = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))} | {"none": "0"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# the official pattern: "(?!<=" is a lookahead, not a lookbehind, so every period not followed by a digit goes
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32  # the official call passes re.UNICODE (32) where re.sub takes the count


def process_punctuation(text: str) -> str:
    """Drop each punctuation mark when it touches a space (or the text has a comma between digits), else turn it
    into a space; then drop periods not followed by a digit (at most 32, as the official call does)."""
    out = text
    drop_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, restore contractions, rejoin with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in ``[0, 1]`` of one predicted answer against the human ``answers`` (ten in VQAv2)."""
    if not answers:
        raise DataError("VQA accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(h == pred for h in humans)
    # leaving out answer k removes one match exactly when answer k matches
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def evaluate_vqa(predictions: Mapping[int, str], questions: Sequence[VQAQuestion]) -> dict[str, object]:
    """Accuracy in percent over annotated ``questions``: ``overall``, ``per_answer_type`` and ``per_question_type``
    (unrounded; the official script rounds to two decimals). Every question needs a prediction."""
    per_question: dict[int, float] = {}
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for q in questions:
        if not q.answers:
            raise DataError(f"question_id {q.question_id} has no human answers (annotations not loaded?)")
        if q.question_id not in predictions:
            raise DataError(f"question_id {q.question_id} has no prediction")
        acc = vqa_accuracy(predictions[q.question_id], q.answers)
        per_question[q.question_id] = acc
        by_answer.setdefault(q.answer_type or "", []).append(acc)
        by_question.setdefault(q.question_type or "", []).append(acc)
    if not per_question:
        raise DataError("no questions to evaluate")

    def pct(values: Sequence[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {"overall": pct(list(per_question.values())),
            "per_answer_type": {k: pct(v) for k, v in by_answer.items()},
            "per_question_type": {k: pct(v) for k, v in by_question.items()}}


__all__ = ["ARTICLES", "CONTRACTIONS", "NUMBER_WORDS", "PUNCTUATION", "evaluate_vqa", "normalize_answer",
           "process_digit_article", "process_punctuation", "vqa_accuracy"]
