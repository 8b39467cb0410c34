"""Super-NaturalInstructions (Super-NI) evaluation: prompts, ROUGE-L / exact match (the command:
``tuna-jax eval superni``, ``commands/eval.py``).

The benchmark as allenai/natural-instructions and Tk-Instruct define it (both Apache-2.0; nothing here is
a verbatim copy): the 119 English test tasks, the first 100 instances of each (11,810 in all,
:func:`load_source`, :func:`iter_eval_instances`); the prompts of Tk-Instruct's ``DataCollatorForNI``,
definition only (0-shot) or definition + 2 positive examples (2-shot) (:func:`build_prompt`); exact match
and ROUGE-L as natural-instructions' ``eval/automatic/evaluation.py`` computes them (:func:`exact_match`,
:func:`rouge_l`, :func:`score_predictions`): each instance the max over its references, a figure 100 x the
mean over instances, overall, per task and per category. Deviations from the official script, none with an
effect on the numbers: a faster longest common subsequence giving the same floats, no rounding, missing
predictions left out of the means and reported (``missing="zero"``: the official behaviour), categories
named as in the data.

The test set, the prompt format, the metrics and the deviations: docs/evaluation.md#superni.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import string
import sys
from collections import Counter, defaultdict
from typing import Any, Callable, Iterator, Mapping, Sequence

from tuna_jax.eval.common import warn
from tuna_jax.io import paths
from tuna_jax.io.errors import InputError
from tuna_jax.io.jsonl import iter_jsonl, read_json, read_text

DEFAULT_NUM_INSTANCES = 100  # first 100 Super-NI instances per test task, as the benchmark evaluates
DEFAULT_SPLIT = "default"    # the English Super-NI track; "xlingual" is the cross-lingual one

__all__ = [
    "DEFAULT_NUM_INSTANCES", "ReferenceRecord", "TaskData", "EvalInstance", "SuperNISource",
    "build_prompt", "load_source", "iter_eval_instances", "normalize_answer", "exact_match",
    "RougeL", "rouge_l", "compute_metrics", "score_predictions",
]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReferenceRecord:
    """One evaluation instance's gold answers, as in the benchmark's reference JSONL."""

    id: str
    task: str
    category: str
    references: tuple[str, ...]
    track: str = DEFAULT_SPLIT


@dataclasses.dataclass
class TaskData:
    """A task with what prompts need: the definition, positive examples and instances."""

    name: str
    categories: list[str]
    definition: str
    positive_examples: list[dict]   # each {"input": str, "output": str, ...}
    instances: list[dict]           # each {"id": str, "input": str, "output": [str, ...]}
    origin: str                     # file it was read from, for error messages

    @property
    def category(self) -> str:
        return self.categories[0] if self.categories else "Uncategorized"


@dataclasses.dataclass(frozen=True)
class EvalInstance:
    """An instance to generate on: call ``prompt(0)`` / ``prompt(2)`` for the 0- / 2-shot source."""

    id: str
    task: str
    category: str
    input: str
    references: tuple[str, ...]
    definition: str
    positive_examples: tuple[dict, ...]

    def prompt(self, num_pos_examples: int = 0, *, add_task_definition: bool = True,
               count_tokens: Callable[[str], int] | None = None,
               max_source_length: int | None = None) -> str:
        return build_prompt(self.definition, self.positive_examples, self.input,
                            num_pos_examples=num_pos_examples,
                            add_task_definition=add_task_definition,
                            count_tokens=count_tokens, max_source_length=max_source_length)

    @property
    def prompt_0shot(self) -> str:
        """Definition only."""
        return self.prompt(0)

    @property
    def prompt_2shot(self) -> str:
        """Definition + two positive examples."""
        return self.prompt(2)


@dataclasses.dataclass
class SuperNISource:
    """What a ``--tasks PATH`` held: references (for scoring) and full tasks (for prompts).

    ``references`` keeps the data's order. ``tasks`` may hold fewer tasks than ``test_tasks``
    (the shared sample has 6 of 119); ``iter_eval_instances`` says so loudly.
    """

    path: str
    kind: str                               # "natural-instructions", "files"
    test_tasks: list[str] | None
    references: dict[str, ReferenceRecord]
    tasks: dict[str, TaskData]
    notes: list[str] = dataclasses.field(default_factory=list)


def _dot(text: str) -> str:
    """Tk-Instruct's rule: end with '.' unless the text already ends in ASCII punctuation."""
    return text if text and text[-1] in string.punctuation else text + "."


def build_prompt(definition: str | Sequence[str], positive_examples: Sequence[Mapping[str, Any]],
                 instance_input: str, *, num_pos_examples: int = 0, add_task_definition: bool = True,
                 count_tokens: Callable[[str], int] | None = None,
                 max_source_length: int | None = None) -> str:
    """The Super-NI evaluation source text (Tk-Instruct ``DataCollatorForNI``; format in docs/evaluation.md#superni).

    ``definition`` may be the task file's list of definitions (the first one is used, as the
    collator does). ``num_pos_examples`` is 0 for the 0-shot and 2 for the 2-shot setting; a task with
    fewer positive examples gets as many as it has, as in the collator. When both ``count_tokens``
    and ``max_source_length`` are given, a positive example that would push the source over the limit
    is dropped together with all later ones (the collator's rule, including its quirk of joining the
    examples kept so far with a space when counting).
    """
    if num_pos_examples < 0:
        raise ValueError(f"num_pos_examples must be >= 0, got {num_pos_examples}")
    if (count_tokens is None) != (max_source_length is None):
        raise ValueError("give both count_tokens and max_source_length, or neither")
    task_input = _dot("Now complete the following example -\n" + f"Input: {instance_input.strip()}")
    task_input += "\nOutput: "

    definition_text = ""
    if add_task_definition:
        if isinstance(definition, (list, tuple)):
            if not definition:
                raise ValueError("the task has an empty Definition list")
            definition = definition[0]
        definition_text = _dot("Definition: " + definition.strip()) + "\n\n"

    examples: list[str] = []
    for idx, ex in enumerate(list(positive_examples)[:num_pos_examples]):
        text = _dot(f" Positive Example {idx + 1} -\n" + f"Input: {ex['input'].strip()}") + "\n"
        text = _dot(text + f" Output: {ex['output'].strip()}") + "\n"
        text += "\n"
        if count_tokens is not None:
            if count_tokens(definition_text + " ".join(examples) + text + task_input) > max_source_length:
                break
        examples.append(text)
    return definition_text + "".join(examples) + task_input


# --------------------------------------------------------------------------------------------------
# Reading the data (a natural-instructions checkout, or files in the shared layout)
# --------------------------------------------------------------------------------------------------

def _read_lines_list(path: pathlib.Path) -> list[str]:
    names = [ln.strip() for ln in read_text(path).splitlines()]
    names = [n for n in names if n]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise InputError(f"{path}: task listed more than once: {dup[:5]}")
    return names


def _check_str_list(value: Any, where: str, field: str, *, non_empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: field '{field}' must be a list of strings")
    if non_empty and not value:
        raise InputError(f"{where}: field '{field}' is empty (max over references needs one)")
    return tuple(value)


def _task_from_obj(obj: Mapping[str, Any], name: str | None, where: str) -> TaskData:
    """Normalises a task in either spelling: the repository's ("Definition", "Positive Examples",
    "Instances", "Categories") or the shared sample's lower_snake_case one with a "task" name."""
    def get(*keys):
        for k in keys:
            if k in obj:
                return obj[k]
        raise InputError(f"{where}: missing field {' / '.join(repr(k) for k in keys)}")

    name = obj.get("task", obj.get("Task", name))
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: the task has no name (field 'task')")
    definition = get("definition", "Definition")
    if isinstance(definition, list):
        if not definition or not isinstance(definition[0], str):
            raise InputError(f"{where}: field 'Definition' must be a non-empty list of strings")
        definition = definition[0]
    if not isinstance(definition, str):
        raise InputError(f"{where}: field 'definition' must be a string")
    categories = obj.get("categories", obj.get("Categories", []))
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise InputError(f"{where}: field 'categories' must be a list of strings")
    pos = get("positive_examples", "Positive Examples")
    if not isinstance(pos, list):
        raise InputError(f"{where}: field 'positive_examples' must be a list")
    for i, ex in enumerate(pos):
        if not (isinstance(ex, dict) and isinstance(ex.get("input"), str)
                and isinstance(ex.get("output"), str)):
            raise InputError(f"{where}: positive example {i} needs string 'input' and 'output'")
    instances = get("instances", "Instances")
    if not isinstance(instances, list):
        raise InputError(f"{where}: field 'instances' must be a list")
    for i, inst in enumerate(instances):
        iw = f"{where}: instance {i}"
        if not isinstance(inst, dict):
            raise InputError(f"{iw}: must be an object")
        if not isinstance(inst.get("id"), str):
            raise InputError(f"{iw}: needs a string 'id'")
        if not isinstance(inst.get("input"), str):
            raise InputError(f"{iw} ({inst['id']}): needs a string 'input'")
        _check_str_list(inst.get("output"), f"{iw} ({inst['id']})", "output")
    return TaskData(name, list(categories), definition, list(pos), instances, where)


def _references_from_task(task: TaskData, num_instances: int) -> list[ReferenceRecord]:
    return [ReferenceRecord(inst["id"], task.name, task.category, tuple(inst["output"]))
            for inst in task.instances[:num_instances]]


def _reference_from_obj(obj: Mapping[str, Any], where: str) -> ReferenceRecord:
    if not isinstance(obj.get("id"), str):
        raise InputError(f"{where}: needs a string 'id'")
    refs = _check_str_list(obj.get("references"), where, "references")
    task = obj.get("task_id")
    if not isinstance(task, str) or not task:
        raise InputError(f"{where}: needs a string 'task_id' (per-task scores are part of the output)")
    category = obj.get("task_category", "Uncategorized")
    if not isinstance(category, str):
        raise InputError(f"{where}: 'task_category' must be a string")
    track = obj.get("track", DEFAULT_SPLIT)  # official default when the field is absent
    return ReferenceRecord(obj["id"], task, category, refs, track)


def _load_jsonl_file(path: pathlib.Path, refs: list[ReferenceRecord], tasks: dict[str, TaskData]) -> None:
    """A JSONL file holds either reference records ("references") or whole tasks ("instances")."""
    for _, where, obj in iter_jsonl(path, what="references file"):
        if "references" in obj:
            refs.append(_reference_from_obj(obj, where))
        elif "instances" in obj or "Instances" in obj:
            task = _task_from_obj(obj, None, where)
            if task.name in tasks:
                raise InputError(f"{where}: task {task.name} given twice (also {tasks[task.name].origin})")
            tasks[task.name] = task
        else:
            raise InputError(f"{where}: neither a reference record (id, references, task_id, "
                             f"task_category) nor a task (task, definition, positive_examples, "
                             f"instances)")


def _find_ni_root(p: pathlib.Path) -> pathlib.Path | None:
    for root in (p, p.parent):
        if (root / "tasks").is_dir() and (root / "splits" / DEFAULT_SPLIT / "test_tasks.txt").is_file():
            return root
    return None


def load_source(path: str | os.PathLike, *, num_instances: int = DEFAULT_NUM_INSTANCES,
                track: str = DEFAULT_SPLIT) -> SuperNISource:
    """Reads ``path``: a natural-instructions checkout, or files in the layout of shared/data/superni.

    * a checkout (``tasks/*.json`` + ``splits/<track>/test_tasks.txt``; the ``tasks`` folder itself
      is accepted too): each listed task file is read, its first ``num_instances`` instances are the
      test set (references = their ``output`` lists, category = ``Categories[0]``);
    * a folder of ``*.jsonl`` files (+ optional ``test_tasks.txt``): reference records
      (``{"id", "references", "task_id", "task_category", "track"}``) and/or whole tasks (``{"task",
      "categories", "definition", "positive_examples", "instances"}``), told apart per line;
    * one such ``.jsonl`` file, or one task ``.json`` file of the repository.

    References are kept for ``track`` only (others are counted in ``notes``); with a task list, only
    the listed tasks. Where references are not given as records, they come from the tasks.
    ``path`` may be in cloud storage (``gs://...``): it is read from a local copy (``io.paths.local_copy``).
    """
    p = pathlib.Path(paths.local_copy(path))
    if not p.exists():
        raise InputError(f"{p}: not found (expected a natural-instructions checkout, a folder "
                         f"like shared/data/superni, or a .jsonl/.json file)")
    if num_instances <= 0:
        raise ValueError(f"num_instances must be positive, got {num_instances}")
    notes: list[str] = []
    refs: list[ReferenceRecord] = []
    tasks: dict[str, TaskData] = {}
    test_tasks: list[str] | None = None

    ni_root = _find_ni_root(p) if p.is_dir() else None
    if ni_root is not None:
        kind = "natural-instructions"
        split_file = ni_root / "splits" / track / "test_tasks.txt"
        if not split_file.is_file():
            raise InputError(f"{split_file}: not found (track {track!r})")
        test_tasks = _read_lines_list(split_file)
        for name in test_tasks:
            tf = ni_root / "tasks" / f"{name}.json"
            if not tf.is_file():
                raise InputError(f"{tf}: task listed in {split_file} is missing from the checkout")
            obj = read_json(tf)
            if not isinstance(obj, dict):
                raise InputError(f"{tf}: expected a JSON object")
            tasks[name] = _task_from_obj(obj, name, str(tf))
            tasks[name].name = name  # the file name is the task id, whatever the file says
        for name in test_tasks:
            refs.extend(dataclasses.replace(r, track=track)
                        for r in _references_from_task(tasks[name], num_instances))
    else:
        kind = "files"
        if p.is_dir():
            files = sorted(p.glob("*.jsonl"))
            if not files:
                raise InputError(f"{p}: no *.jsonl files and not a natural-instructions checkout "
                                 f"(no tasks/ + splits/{DEFAULT_SPLIT}/test_tasks.txt)")
            for f in files:
                _load_jsonl_file(f, refs, tasks)
            if (p / "test_tasks.txt").is_file():
                test_tasks = _read_lines_list(p / "test_tasks.txt")
        elif p.suffix == ".jsonl":
            _load_jsonl_file(p, refs, tasks)
        elif p.suffix == ".json":
            obj = read_json(p)
            if not isinstance(obj, dict):
                raise InputError(f"{p}: expected a task JSON object")
            task = _task_from_obj(obj, p.stem, str(p))
            tasks[task.name] = task
        else:
            raise InputError(f"{p}: expected a folder, a .jsonl or a .json file")
        if not refs:  # references only from tasks: the benchmark's first-N rule
            names = test_tasks if test_tasks is not None else list(tasks)
            for name in names:
                if name in tasks:
                    refs.extend(_references_from_task(tasks[name], num_instances))

    other_track = [r for r in refs if r.track != track]
    if other_track:
        notes.append(f"{len(other_track)} reference records of other tracks left out")
        refs = [r for r in refs if r.track == track]
    if test_tasks is not None:
        unlisted = [r for r in refs if r.task not in set(test_tasks)]
        if unlisted:
            notes.append(f"{len(unlisted)} reference records of tasks not in test_tasks.txt left out")
            listed = set(test_tasks)
            refs = [r for r in refs if r.task in listed]
        have = {r.task for r in refs}
        absent = [t for t in test_tasks if t not in have]
        if absent:
            notes.append(f"{len(absent)} listed test tasks have no references: {absent[:5]}")

    by_id: dict[str, ReferenceRecord] = {}
    for r in refs:
        if r.id in by_id:
            raise InputError(f"{p}: instance id {r.id!r} appears twice in the references")
        by_id[r.id] = r
    if not by_id:
        raise InputError(f"{p}: no reference instances found (track {track!r})")
    return SuperNISource(str(p), kind, test_tasks, by_id, tasks, notes)


def _as_source(source: Any, track: str = DEFAULT_SPLIT) -> SuperNISource:
    if isinstance(source, SuperNISource):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_source(source, track=track)
    if isinstance(source, Mapping):
        source = list(source.values())
    refs: dict[str, ReferenceRecord] = {}
    for i, r in enumerate(source):
        if isinstance(r, Mapping):
            r = _reference_from_obj(r, f"references[{i}]")
        if not isinstance(r, ReferenceRecord):
            raise TypeError(f"references[{i}]: expected ReferenceRecord or mapping, got {type(r).__name__}")
        if r.id in refs:
            raise InputError(f"references[{i}]: duplicate id {r.id!r}")
        refs[r.id] = r
    return SuperNISource("<in-memory>", "records", None, refs, {})


def iter_eval_instances(source: str | os.PathLike | SuperNISource, *,
                        num_instances: int = DEFAULT_NUM_INSTANCES,
                        tasks: Sequence[str] | None = None,
                        require_all_tasks: bool = False) -> Iterator[EvalInstance]:
    """Yields the instances to generate on, task by task in test-split order.

    ``tasks`` restricts to some tasks (each must be available). Without it, all test tasks that the
    source holds in full are used; test tasks that only have references (the shared sample has 6 of
    the 119 in full) are reported on stderr, or are an error with ``require_all_tasks``.
    """
    src = _as_source(source)
    if not src.tasks:
        raise InputError(f"{src.path}: has references only; prompts need the task definitions and "
                         f"examples -- clone allenai/natural-instructions and pass the checkout")
    if tasks is not None:
        names = list(tasks)
        absent = [t for t in names if t not in src.tasks]
        if absent:
            raise InputError(f"{src.path}: tasks not available in full: {absent}")
    else:
        names = list(src.test_tasks) if src.test_tasks is not None else list(src.tasks)
        absent = [t for t in names if t not in src.tasks]
        if absent:
            msg = (f"{src.path}: {len(absent)} of {len(names)} test tasks are not available in full "
                   f"(no definition/examples), e.g. {absent[:3]}; generating for the other "
                   f"{len(names) - len(absent)} only")
            if require_all_tasks:
                raise InputError(msg)
            warn(msg)
        names = [t for t in names if t in src.tasks]
    for name in names:
        td = src.tasks[name]
        for inst in td.instances[:num_instances]:
            yield EvalInstance(inst["id"], name, td.category, inst["input"], tuple(inst["output"]),
                               td.definition, tuple(td.positive_examples))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower-case, remove ASCII punctuation, collapse whitespace (SQuAD's, keeping articles)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    return " ".join(s.split())


_PUNCT = frozenset(string.punctuation)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel.

    The Allison-Dix / Hyyro recurrence: bit i of ``v`` stays 1 while a[i] is not yet in the LCS;
    per token of ``b``: u = v & match(b_j); v = (v + u) | (v - u). The LCS length is the number of
    zero bits among the low len(a) bits. Python integers make the row as wide as needed.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = match.get(tok)
        if m is None:
            continue  # u = 0 leaves v unchanged
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


class _CachedStemmer:
    """Memoises a stemmer (Porter stemming dominates tokenisation time; words repeat a lot)."""

    def __init__(self, stemmer):
        self.stem = functools.lru_cache(maxsize=1 << 18)(stemmer.stem)


class _GPT2Tokenizer:
    """The benchmark's cross-lingual tokenizer: GPT-2 byte-level BPE pieces without the "Ġ"."""

    def __init__(self):
        try:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained("gpt2")
        except Exception as e:  # offline, or transformers missing
            raise InputError(f"the xlingual track needs the GPT-2 tokenizer, which could not be "
                             f"loaded ({type(e).__name__}: {e})") from e

    def tokenize(self, s: str) -> list[str]:
        return [t.lstrip("Ġ") for t in self._tok.tokenize(s)]


class RougeL:
    """ROUGE-L F-measure as Super-NI computes it (rouge_score ``rougeL``; see docs/evaluation.md#superni).

    ``xlingual=False``: rouge_score's default tokenizer with the Porter stemmer. ``xlingual=True``:
    GPT-2 tokens, no stemming (the official cross-lingual scorer). Scores are in [0, 1].
    """

    def __init__(self, xlingual: bool = False):
        self.xlingual = xlingual
        if xlingual:
            self._tokenizer = _GPT2Tokenizer()
            self.tokenize = self._tokenizer.tokenize
        else:
            from rouge_score import tokenize as rs_tokenize
            from rouge_score import tokenizers as rs_tokenizers
            default = rs_tokenizers.DefaultTokenizer(use_stemmer=True)
            stemmer = getattr(default, "_stemmer", None)
            if stemmer is None:  # a future rouge_score without the attribute: use it uncached
                self.tokenize = default.tokenize
            else:
                cached = _CachedStemmer(stemmer)
                self.tokenize = lambda text: rs_tokenize.tokenize(text, cached)
        from rouge_score import scoring
        self._fmeasure = scoring.fmeasure

    def score_tokens(self, prediction_tokens: Sequence[str], target_tokens: Sequence[str]) -> float:
        # Mirrors rouge_score.rouge_scorer._score_lcs, so the float is bit-identical.
        if not target_tokens or not prediction_tokens:
            return 0.0
        lcs = _lcs_length(target_tokens, prediction_tokens)
        precision = lcs / len(prediction_tokens)
        recall = lcs / len(target_tokens)
        return self._fmeasure(precision, recall)

    def score(self, prediction: str, reference: str) -> float:
        return self.score_tokens(self.tokenize(prediction), self.tokenize(reference))

    def max_over_references(self, prediction: str, references: Sequence[str]) -> float:
        pred_tokens = self.tokenize(prediction)
        return max(self.score_tokens(pred_tokens, self.tokenize(r)) for r in references)


@functools.lru_cache(maxsize=2)
def _scorer(xlingual: bool) -> RougeL:
    return RougeL(xlingual)


def rouge_l(prediction: str, reference: str, xlingual: bool = False) -> float:
    """ROUGE-L F in [0, 1] of one prediction against one reference."""
    return _scorer(xlingual).score(prediction, reference)


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    xlingual: bool = False) -> dict[str, float]:
    """``{"exact_match", "rougeL"}``, each 100 x the mean over instances of the max over references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no instances to score")
    scorer = _scorer(xlingual)
    em = rl = 0.0
    for pred, gold in zip(predictions, references):
        if isinstance(gold, str) or not gold:
            raise ValueError("each instance needs a non-empty list of references")
        em += max(exact_match(pred, g) for g in gold)
        rl += scorer.max_over_references(pred, gold)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "rougeL": 100.0 * rl / n}


def score_predictions(predictions: Mapping[str, str], references_source: Any, *,
                      missing: str = "skip", track: str = DEFAULT_SPLIT, progress: bool = False) -> dict[str, Any]:
    """Scores ``{id: prediction}`` against a reference source (a path for ``load_source``, a
    ``SuperNISource``, or reference records / mappings).

    Returns ``overall`` (ROUGE-L, 100 x mean over scored instances), ``exact_match``, ``per_task``,
    ``per_category`` (ROUGE-L) with their exact-match twins, and the bookkeeping: ``num_scored``,
    ``num_references``, ``missing`` (+ ``missing_per_task``), ``unknown`` (+ a few ``unknown_ids``).
    ``missing="skip"`` leaves instances without a prediction out of every mean; ``missing="zero"``
    scores them as the empty string, as the official script does. ``progress``: a bar on stderr.
    """
    if missing not in ("skip", "zero"):
        raise ValueError(f"missing must be 'skip' or 'zero', got {missing!r}")
    src = _as_source(references_source, track)
    scorer = _scorer(track == "xlingual")
    rl_sum: dict[str, float] = defaultdict(float)
    em_sum: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    cat_rl: dict[str, float] = defaultdict(float)
    cat_em: dict[str, float] = defaultdict(float)
    cat_count: dict[str, int] = defaultdict(int)
    missing_per_task: dict[str, int] = defaultdict(int)
    total_rl = total_em = 0.0
    n_scored = 0
    from tqdm import tqdm

    for rec in tqdm(src.references.values(), desc="superni", unit="ex", disable=not progress, file=sys.stderr):
        pred = predictions.get(rec.id)
        if pred is None:
            missing_per_task[rec.task] += 1
            if missing == "skip":
                continue
            pred = ""
        if not isinstance(pred, str):
            raise InputError(f"prediction for {rec.id!r} is {type(pred).__name__}, not a string")
        em = float(max(exact_match(pred, g) for g in rec.references))
        rl = scorer.max_over_references(pred, rec.references)
        n_scored += 1
        total_rl += rl
        total_em += em
        rl_sum[rec.task] += rl
        em_sum[rec.task] += em
        count[rec.task] += 1
        cat_rl[rec.category] += rl
        cat_em[rec.category] += em
        cat_count[rec.category] += 1
    unknown = [i for i in predictions if i not in src.references]
    n_missing = sum(missing_per_task.values())
    if n_scored == 0:
        hint = f" (e.g. prediction id {unknown[0]!r} is not a reference id)" if unknown else ""
        raise InputError(f"{src.path}: none of the {len(src.references)} reference instances has a "
                         f"prediction{hint}")
    return {
        "overall": 100.0 * total_rl / n_scored,
        "exact_match": 100.0 * total_em / n_scored,
        "per_task": {t: 100.0 * rl_sum[t] / count[t] for t in count},
        "per_category": {c: 100.0 * cat_rl[c] / cat_count[c] for c in cat_count},
        "per_task_exact_match": {t: 100.0 * em_sum[t] / count[t] for t in count},
        "per_category_exact_match": {c: 100.0 * cat_em[c] / cat_count[c] for c in cat_count},
        "num_scored": n_scored,
        "num_references": len(src.references),
        "num_tasks": len(count),
        "missing": n_missing,
        "missing_policy": missing,
        "missing_per_task": {t: n for t, n in missing_per_task.items() if n},
        "unknown": len(unknown),
        "unknown_ids": unknown[:20],
        "track": track,
        "metric": "rougeL (rouge_score, stemmed; max over references; x100)",
        "notes": list(src.notes),
    }
