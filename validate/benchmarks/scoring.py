"""Official answer processing and scoring of the mPLUG-Owl3 evaluation (spec §9), as small pure functions.

Everything here reproduces the official code's behaviour, quirks included, so that a reimplementation
scores exactly as the paper's numbers were scored. Where the official code would crash on an input
(an empty ground truth, a zero denominator) the function says what it does instead.

- VQA accuracy (VQAv2, OK-VQA, TextVQA): the standard VQA evaluation (normalisation, leave-one-out
  ``min(1, matches / 3)``), after a per-task pre-processing (VQAv2: the EvalAI answer processor).
- POPE: yes / no / other labels and accuracy, precision, recall, F1, yes-proportion.
- MMBench: letter extraction (regex, then option text, else ``"X"``); circular scoring lives in the task.
- NextQA: the first character of the output; MVBench: ``check_answer``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from owl3.validate.items import Item

# ---- VQA normalisation (standard VQA evaluation) -----------------------------------------------------------

# The standard contraction table as "written fixed" pairs. Its keys with capitals ("Im", "Id've") can never
# match (words are lowercased first), and "somebody'd" maps *away* from the apostrophe: both as in the
# reference tables, kept so that scores match exactly.
_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's
howd how'd  howll how'll  hows how's  Id've I'd've  I'dve I'd've  Im I'm  Ive I've  isnt isn't  itd it'd
itd've it'd've  it'dve it'd've  itll it'll  let's let's  maam ma'am  mightnt mightn't
mightnt've mightn't've  mightn'tve mightn't've  mightve might've  mustnt mustn't  mustve must've
neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't  ow's'at 'ow's'at  'ows'at 'ow's'at
'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've  she's she's  shouldve should've
shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've  somebody'd somebodyd
somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll  somebodys somebody's
someoned someone'd  someoned've someone'd've  someone'dve someone'd've  someonell someone'll
someones someone's  somethingd something'd  somethingd've something'd've  something'dve something'd've
somethingll something'll  thats that's  thered there'd  thered've there'd've  there'dve there'd've
therere there're  theres there's  theyd they'd  theyd've they'd've  they'dve they'd've  theyll they'll
theyre they're  theyve they've  twas 'twas  wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've
werent weren't  whatll what'll  whatre what're  whats what's  whatve what've  whens when's  whered where'd
wheres where's  whereve where've  whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's
whove who've  whyll why'll  whyre why're  whys why's  wont won't  wouldve would've  wouldnt wouldn't
wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've
you'dve you'd've  youll you'll  youre you're  youve you've
"""
_words = _CONTRACTION_PAIRS.split()
CONTRACTIONS: dict[str, str] = dict(zip(_words[0::2], _words[1::2], strict=True))
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A comma between digits ("1,000") switches every punctuation mark to deletion instead of a space.
VQA_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
EVALAI_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")
# A period not followed by a digit is dropped. The reference pattern's leading "(?!<=\d)" is a lookahead
# that can never fail at a '.', and it passes re.UNICODE (32) as the *count*: at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32


def process_punctuation(text: str, comma_between_digits: re.Pattern[str] = VQA_COMMA_BETWEEN_DIGITS) -> str:
    """VQA ``processPunctuation``: each mark is deleted when it touches a space in the *input* (or the
    input has a comma between digits), otherwise replaced by a space; then periods not before a digit go.
    """
    out = text
    delete_all = comma_between_digits.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """VQA ``processDigitArticle``: lowercase, number words to digits, drop a/an/the, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The prediction side of the VQA evaluation: tabs/newlines to spaces, strip, punctuation, digits/articles."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_process(answer: str) -> str:
    """The EvalAI answer processor (VQAv2's pre-processing): lowercase, drop ',' and '?', split "'s",
    then the same punctuation and digit/article normalisation (with EvalAI's comma pattern)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, EVALAI_COMMA_BETWEEN_DIGITS))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one (pre-processed) prediction against the human answers, in [0, 1].

    The prediction is normalised (``normalize_vqa_answer``); the ground-truth answers only get
    ``process_punctuation``, and only when they are not all identical. For each answer i, accuracy is
    ``min(1, #other answers equal to the prediction / 3)``; the result is the mean over i. With 10 answers
    1/2/3/4+ matches give 0.3/0.6/0.9/1.0. Answers are left out by position (the reference compares answer
    records, which differ by ``answer_id`` in the official annotations).
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    predicted = normalize_vqa_answer(prediction)
    answers = list(gt_answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    matches = [a == predicted for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


def strip_answer(answer: str) -> str:
    """OK-VQA / TextVQA pre-processing."""
    return answer.strip()


def vizwiz_process(answer: str) -> str:
    """VizWiz pre-processing: the text before the first '.' and ',' , stripped."""
    return answer.split(".")[0].split(",")[0].strip()


# ---- POPE ---------------------------------------------------------------------------------------------------

POPE_NO, POPE_YES, POPE_OTHER = 0, 1, 2


def pope_process(prediction: str) -> str:
    """POPE post-processing: strip, then the text before the first '.' and the first ','."""
    return prediction.strip().split(".")[0].split(",")[0]


def pope_label(prediction: str) -> int:
    """1 for "yes", 0 for "no", 2 for anything else (after ``pope_process``, stripped and lowercased)."""
    text = pope_process(prediction).strip().lower()
    return POPE_YES if text == "yes" else POPE_NO if text == "no" else POPE_OTHER


def pope_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Official POPE metrics from predicted labels (0/1/2) and ground truth (0/1).

    As in the reference confusion matrix, a prediction of 2 falls in no cell: it is excluded from accuracy,
    precision and recall, and counts in the yes-proportion's denominator. Where the reference would divide
    by zero the value is NaN. Also returns the counts (tp, fp, fn, tn, other).
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equally many predictions and labels, got {len(predictions)} and {len(labels)}")
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == 1 and t == 1 for p, t in pairs)
    fp = sum(p == 1 and t == 0 for p, t in pairs)
    fn = sum(p == 0 and t == 1 for p, t in pairs)
    tn = sum(p == 0 and t == 0 for p, t in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_proportion": sum(p == POPE_YES for p in predictions) / len(predictions),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "other": sum(p == POPE_OTHER for p in predictions),
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den and not math.isnan(den) else math.nan


# ---- multiple choice ----------------------------------------------------------------------------------------


def _choice_in(text: str) -> str | None:
    """The first of E, D, C, B, A (in that order) written as a letter followed by '.', ',', ':' or ')'.

    The reference also tries ``\\b{X}[.,:)]\\b`` per letter; every match of it is a match of the first
    pattern, so it never changes the result.
    """
    for letter in "EDCBA":
        if re.search(rf"\b{letter}[.,:)]", text):
            return letter
    return None


def mmbench_extract(prediction: str, options: Sequence[str]) -> str:
    """MMBench answer letter: the regex on the output, then on output + '.', then the first option whose
    text contains the output or is contained in it (case-insensitive), else ``"X"``.

    As in the reference, the text fallback sees only options A-D, so an empty output picks option A.
    """
    letter = _choice_in(prediction) or _choice_in(prediction + ".")
    if letter:
        return letter
    output = prediction.lower()
    for letter, option in zip("ABCD", options, strict=False):
        text = option.lower()
        if output in text or text in output:
            return letter
    return "X"


def nextqa_extract(prediction: str) -> str:
    """NextQA: the first character of the stripped output, lowercased; ``"x"`` for an empty output."""
    text = prediction.strip()
    return text[0].lower() if text else "x"


def mvbench_check_answer(prediction: str, gt_answer: str) -> bool:
    """MVBench ``check_answer`` (mPLUG-Owl3 variant); ``gt_answer`` is ``"B. the option text"``.

    Both are lowercased and split on single spaces into (first token, rest). Correct when the prediction's
    first token without '.' (stripped) is a substring of the gt letter token (so "B", "B." and an empty
    output all pass for "b."), or the gt text without one final '.' (stripped) is a substring of the rest of
    the prediction. The reference indexes ``gt_content[-1]``; an empty gt text is left as is here.
    """
    pred_option, _, pred_content = prediction.lower().partition(" ")
    gt_option, _, gt_content = gt_answer.lower().partition(" ")
    if gt_content.endswith("."):
        gt_content = gt_content[:-1]
    return pred_option.replace(".", "").strip() in gt_option or gt_content.strip() in pred_content


# ---- tasks (the owl3.validate.items.Task protocol) -----------------------------------------------------------


class _PerItemTask:
    """A task whose scoring unit is one item: the unit score is the item's score."""

    name = ""
    binary = True

    def unit_score(self, scores: Sequence[float]) -> float:
        if not scores:
            raise ValueError(f"{self.name}: a unit needs at least one item score")
        return sum(scores) / len(scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class VQAAccuracyTask(_PerItemTask):
    """VQA accuracy after a per-benchmark pre-processing (VQAv2: EvalAI; OK-VQA, TextVQA: strip)."""

    binary = False

    def __init__(self, name: str = "vqav2", preprocess: Callable[[str], str] = evalai_process) -> None:
        self.name = name
        self.preprocess = preprocess

    def extract(self, item: Item, prediction: str) -> str:
        """The normalised answer that is compared with the human answers."""
        return normalize_vqa_answer(self.preprocess(prediction))

    def score(self, item: Item, prediction: str) -> float:
        return vqa_accuracy(self.preprocess(prediction), item.answer)


class PopeTask(_PerItemTask):
    """POPE: the answer is "yes" or "no"; anything else is wrong."""

    def __init__(self, name: str = "pope") -> None:
        self.name = name

    def extract(self, item: Item, prediction: str) -> str:
        return ("no", "yes", "other")[pope_label(prediction)]

    def score(self, item: Item, prediction: str) -> float:
        return float(pope_label(prediction) == pope_label(item.answer))

    def metrics(self, items: Sequence[Item], predictions: Sequence[str]) -> dict[str, float]:
        """Accuracy, precision, recall, F1 and yes-proportion over ``items`` (``pope_metrics``)."""
        labels = [pope_label(item.answer) for item in items]
        return pope_metrics([pope_label(p) for p in predictions], labels)


class MMBenchTask(_PerItemTask):
    """MMBench with circular evaluation: a question (unit) counts only when every variant is right."""

    def __init__(self, name: str = "mmbench") -> None:
        self.name = name

    def extract(self, item: Item, prediction: str) -> str:
        return mmbench_extract(prediction, item.meta.get("options", ()))

    def score(self, item: Item, prediction: str) -> float:
        return float(self.extract(item, prediction) == item.answer)

    def unit_score(self, scores: Sequence[float]) -> float:
        if not scores:
            raise ValueError(f"{self.name}: a unit needs at least one item score")
        return float(all(s == 1.0 for s in scores))


class NextQATask(_PerItemTask):
    """NextQA multiple choice: the output's first character against the answer letter."""

    def __init__(self, name: str = "nextqa") -> None:
        self.name = name

    def extract(self, item: Item, prediction: str) -> str:
        return nextqa_extract(prediction)

    def score(self, item: Item, prediction: str) -> float:
        return float(nextqa_extract(prediction) == str(item.answer).lower())


class MVBenchTask(_PerItemTask):
    """MVBench: ``check_answer`` against ``"<letter>. <option text>"`` (kept in ``item.meta["gt_answer"]``)."""

    def __init__(self, name: str = "mvbench") -> None:
        self.name = name

    def extract(self, item: Item, prediction: str) -> str:
        """The option token the check compares: the output's first word, lowercased, without '.'."""
        return prediction.lower().partition(" ")[0].replace(".", "").strip()

    def score(self, item: Item, prediction: str) -> float:
        return float(mvbench_check_answer(prediction, item.meta["gt_answer"]))
