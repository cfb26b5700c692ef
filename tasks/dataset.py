"""Task ``dataset``: your own labelled data as a task, configured in YAML, no Python.

    task:
      name: dataset
      label: unit-conversion          # what reports call it
      train_file: data/train.jsonl    # .jsonl .json .csv .parquet, or hf_dataset (+ hf_config, train_split)
      test_file: data/test.jsonl      # or test_fraction: 0.2 (a fixed split of the train file)
      prompt: "{{ question }}\\nOptions: {{ options | join(', ') }}"   # Jinja2 over the row
      answer: "{{ label }}"           # the reference
      extract: choice                 # how a completion's answer is read (rlbench.tasks.answers)
      verifier: choice                # how it is compared (rlbench.tasks.verifiers)
      choices: options                # the field listing the options (choice: option text = its letter)

Templates are Jinja2 (sandboxed, undefined fields are errors); a row missing a field the
templates use stops the run with file:line and the nearest field name, when the task is built,
which ``rlbench run`` does before loading a model (``rlbench task check``). The prompt goes
through the chat template with the system prompt and ``instruction`` as in the other tasks;
the format reward and the overlong penalty are theirs too (rlbench.tasks.common).

More held-out sets: ``eval_files: {ood_rephrased: data/rephrased.jsonl}`` adds splits that
``eval.splits`` evaluates beside ``test`` (same templates; name out-of-distribution ones ``ood_*``).

Rewards: ``accuracy`` (the verifier's score in [0, 1]), ``format`` and, when on, ``overlong``.
Paths are relative to the working directory. Relative paths in a suite resolve from where the
suite is run.

Not covered: multi-turn or tool-using tasks; several references per row other than through a
``regex`` or a ``module:function`` verifier; few-shot examples (write them into the prompt).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import rlbench
from rlbench.tasks import answers, rows as rowsmod, verifiers
from rlbench.tasks.common import PromptConfig, chat_messages, chat_prompt, components, sample
from rlbench.types import DataError, Prompt


@rlbench.hookimpl
def rlbench_tasks():
    return {"dataset": "rlbench.tasks.dataset:Dataset"}


@dataclass
class DatasetConfig(PromptConfig):
    prompt: str = ""  # Jinja2 template of the user message over a row (required)
    answer: str = ""  # Jinja2 template of the reference answer (required)
    extract: str = "tags_or_last_line"  # tags | tags_or_last_line | last_number | boxed | choice | code | regex: P
    verifier: str = "exact"  # numeric | math | exact | choice | regex | f1 | code_tests | module:function
    instruction: str = "Put the final answer inside <answer></answer> tags."  # appended to the prompt
    choices: str = ""  # the row field listing the options in letter order (verifier choice)
    tests: str = ""  # Jinja2 template of the row's test code: asserts calling one function (code_tests)
    id: str = ""  # Jinja2 template of a row's stable id (default: its split and position)
    gold: str = ""  # Jinja2 template of the reference written as a completion (default: from extract)
    train_where: str = ""  # a Jinja2 expression over a row: only the rows where it is true (e.g. "task_id > 600")
    test_where: str = ""  # the same for the test file (one file may hold both splits)
    test_fraction: float = 0.0  # no test_file: this share of the train rows, fixed by split_seed, is held out
    # more held-out splits, name -> file, rendered with the same templates and evaluated beside "test"
    # with eval.splits; name the out-of-distribution ones ood_* (e.g. {ood_rephrased: data/rephrased.jsonl})
    eval_files: dict = field(default_factory=dict)
    split_seed: int = 0  # the held-out share is the same for every run seed
    train_split: str = "train"  # hf_dataset split names
    test_split: str = "test"
    max_gold_rejects: int = 0  # rlbench run refuses a task whose verifier rejects more gold answers
    verify_timeout_s: float = 5.0  # math: per answer
    timeout_s: float = 10.0  # code_tests: per program
    memory_mb: int = 1024
    sandbox_workers: int = 4
    sandbox_allow_weak: bool = False  # code_tests without bubblewrap (rlimits only; network reachable)

    def validate(self):
        super().validate()
        if not self.prompt or not self.answer:
            raise ValueError("the dataset task needs prompt and answer templates (Jinja2 over a row), "
                             "e.g. prompt: '{{ question }}', answer: '{{ answer }}'")
        if not (self.train_file or self.hf_dataset):
            raise ValueError("the dataset task needs train_file (or hf_dataset)")
        if self.test_file and self.test_fraction:
            raise ValueError("give test_file or test_fraction, not both")
        if not (self.test_file or self.test_fraction or self.hf_dataset):
            raise ValueError("the dataset task needs a held-out set: test_file, or test_fraction (e.g. 0.2)")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in [0, 1)")
        reason = answers.check_mode(self.extract)
        if reason:
            raise ValueError(reason)
        verifiers.resolve(self.verifier)
        if self.verifier == "code_tests" and not self.tests:
            raise ValueError("verifier code_tests needs tests: a template of the row's asserts, e.g. "
                             "\"{{ test_list | join('\\n') }}\"")
        bad = [k for k in self.eval_files if not isinstance(k, str) or k in ("train", "test") or not k]
        if bad or not all(isinstance(v, str) and v for v in self.eval_files.values()):
            raise ValueError(f"eval_files maps new split names (not train or test) to files; got {self.eval_files!r}")
        if self.max_gold_rejects < 0:
            raise ValueError("max_gold_rejects must be >= 0")
        for key in ("prompt", "answer", "tests", "id", "gold"):
            _template(getattr(self, key), key)
        for key in ("train_where", "test_where"):
            _expression(getattr(self, key), key)


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def _template(source: str, key: str):
    """(compiled template, the row fields it reads) or (None, set()) for an empty one."""
    if not source:
        return None, set()
    from jinja2 import TemplateSyntaxError, meta

    env = _environment()
    try:
        fields = meta.find_undeclared_variables(env.parse(source))
        return env.from_string(source), set(fields) - {"row"}
    except TemplateSyntaxError as e:
        raise ValueError(f"task.{key}: not a valid Jinja2 template ({e.message}, line {e.lineno})") from None


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 5] + "…" + text[-4:]


def _expression(source: str, key: str):
    if not source:
        return None
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().compile_expression(source)
    except TemplateSyntaxError as e:
        raise ValueError(f"task.{key}: not a valid Jinja2 expression ({e.message})") from None


def _select(rows: list[rowsmod.Row], source: str, key: str) -> list[rowsmod.Row]:
    """The rows where the expression ``source`` is true (all of them when it is empty)."""
    test = _expression(source, key)
    if test is None:
        return rows
    out = []
    for r in rows:
        try:
            keep = test(**r.data, row=r.data)
        except Exception as e:  # noqa: BLE001 - any evaluation error is this row's error
            raise DataError(f"{r.where}: task.{key} does not evaluate on this row ({type(e).__name__}: {e})") from None
        if keep:
            out.append(r)
    if not out:
        raise DataError(f"task.{key} {source!r} keeps none of the {len(rows)} rows")
    return out


class Dataset:
    """The rows of the spec's files, rendered into prompts and references when the task is built."""

    Config = DatasetConfig

    def __init__(self, config: DatasetConfig, tokenizer):
        self.config = config
        self.tok = tokenizer
        c = config
        if c.verifier == "code_tests":
            from rlbench.tasks import sandbox

            self.isolation = sandbox.require(c.sandbox_allow_weak)
        else:
            self.isolation = None
        self.verify = verifiers.resolve(c.verifier)
        self.options = verifiers.VerifyOptions(
            choices=c.choices, tests=c.tests, math_timeout_s=c.verify_timeout_s, timeout_s=c.timeout_s,
            memory_mb=c.memory_mb, sandbox_workers=c.sandbox_workers,
            sandbox_level=self.isolation["level"] if self.isolation else "bwrap")
        self.templates = {k: _template(getattr(c, k), k) for k in ("prompt", "answer", "tests", "id", "gold")}
        self.files = {}  # data file -> sha256 prefix (manifest.json)
        self.items = {split: self._build(split, raw) for split, raw in self._raw_splits().items()}
        self.by_id = {item["id"]: item for split in self.items.values() for item in split}

    # -- data -------------------------------------------------------------------------------

    def _raw_splits(self) -> dict[str, list[rowsmod.Row]]:
        c = self.config
        if c.hf_dataset:
            train = rowsmod.read_hf(c.hf_dataset, c.hf_config, c.train_split)
            test = rowsmod.read_hf(c.hf_dataset, c.hf_config, c.test_split) if not c.test_fraction else None
        else:
            train = rowsmod.read_file(c.train_file)
            self.files[c.train_file] = rowsmod.file_hash(c.train_file)
            test = None
            if c.test_file:
                test = _select(rowsmod.read_file(c.test_file), c.test_where, "test_where")
                self.files[c.test_file] = rowsmod.file_hash(c.test_file)
        train = _select(train, c.train_where, "train_where")
        if test is None:  # a fixed share of the train rows is held out
            order = list(range(len(train)))
            random.Random(c.split_seed).shuffle(order)
            held = set(order[:max(1, round(c.test_fraction * len(train)))])
            if len(held) >= len(train):
                raise DataError(f"{c.train_file or c.hf_dataset}: {len(train)} row(s) leave nothing to train on "
                                f"with test_fraction {c.test_fraction}")
            test = [r for i, r in enumerate(train) if i in held]
            train = [r for i, r in enumerate(train) if i not in held]
        extra = {}
        for name, path in c.eval_files.items():  # eval.splits' other held-out sets
            extra[name] = rowsmod.read_file(path)
            self.files[path] = rowsmod.file_hash(path)
        return {"train": train, "test": test, **extra}

    def _build(self, split: str, raw: list[rowsmod.Row]) -> list[dict]:
        fields = set().union(*(fields for _, fields in self.templates.values()))
        if self.config.choices:
            fields.add(self.config.choices)
        rowsmod.check_fields(raw, fields, "used by the task's templates")
        out = []
        for r in raw:
            item = {"row": r.data, "where": r.where,
                    "question": self._render("prompt", r), "answer": self._render("answer", r).strip()}
            item["id"] = f"dataset/{split}/" + (self._render("id", r).strip() if self.config.id else str(r.index))
            if self.config.tests:
                item["tests"] = self._render("tests", r)
            out.append(item)
        return out

    def _render(self, key: str, row: rowsmod.Row) -> str:
        template, _ = self.templates[key]
        try:
            return template.render(**row.data, row=row.data)
        except Exception as e:  # noqa: BLE001 - any template error is this row's error
            raise DataError(f"{row.where}: task.{key} does not render on this row ({type(e).__name__}: {e})") from None

    # -- the Task protocol ------------------------------------------------------------------------

    def records(self, split: str) -> list[dict]:
        if split not in self.items:
            raise DataError(f"the dataset task has splits {', '.join(map(repr, self.items))}, not {split!r}")
        return self.items[split]

    def splits(self) -> list[str]:
        """The held-out splits (``eval.splits``): ``test`` and ``eval_files``' names."""
        return [s for s in self.items if s != "train"]

    def size(self, split: str) -> int:
        return len(self.records(split))

    def _prompt(self, item: dict) -> Prompt:
        user = item["question"] + (f"\n{self.config.instruction}" if self.config.instruction else "")
        text, prefilled = chat_prompt(self.tok, self.config, user)
        return Prompt(id=item["id"], text=text, answer=item["answer"],
                      meta={"question": item["question"], "prefilled_think": prefilled, "messages": chat_messages(self.config, user)})

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        return [self._prompt(item) for item in sample(self.records(split), split, n, seed)]

    def all_prompts(self, split: str) -> list[Prompt]:
        """Every row of ``split`` in file order (``rlbench task check``)."""
        return [self._prompt(item) for item in self.records(split)]

    def correct(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        items = [self.by_id[p.id] for p in prompts]
        rows = [{**it["row"], "__tests__": it.get("tests", "")} for it in items]
        predictions = [answers.extract(t, self.config.extract) for t in texts]
        return self.verify(predictions, [p.answer for p in prompts], rows, self.options)

    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, list[float]]:
        return components(self.config, self.tok, prompts, texts, self.correct(prompts, texts))

    # -- what rlbench task check and the manifest read --------------------------------------------

    def gold(self, prompt: Prompt) -> str | None:
        """The reference written as a completion the task accepts (the self-check)."""
        item = self.by_id[prompt.id]
        if self.config.gold:
            return self._render("gold", rowsmod.Row(item["row"], item["where"], 0))
        if self.config.verifier == "regex":
            return None  # the reference is a pattern, not an answer
        return answers.gold_completion(item["answer"], self.config.extract)

    def why(self, prompt: Prompt, text: str) -> str:
        """What the task read from ``text`` (and, for code, the sandbox's verdict): a reject's reason."""
        prediction = answers.extract(text, self.config.extract)
        if self.config.verifier == "code_tests" and prediction is not None:
            return "sandbox: " + verifiers.code_verdict(prediction, self.by_id[prompt.id].get("tests", ""), self.options).reason
        return f"read {_short(prediction)}"

    def where(self, prompt: Prompt) -> str:
        return self.by_id[prompt.id]["where"]

    def manifest_info(self) -> dict:
        info = {"data_files": self.files, "rows": {k: len(v) for k, v in self.items.items()}}
        if self.isolation:
            info["sandbox"] = self.isolation
        return info
