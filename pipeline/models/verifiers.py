"""Verifiable rewards: a response scored against its row's reference answer (`judge.kind: verifier`).

The answer rule (`final_answer`), applied to responses and to reference answers alike, so GSM8K's
`... #### 72` answers `72`:
1. the content of the last `\\boxed{...}` (braces balanced), if there is one;
2. else the text after the last `####`, to the end of its line;
3. else the last number: an optional minus sign, digits with optional thousands commas (`1,234`), an optional
   decimal part;
4. else no answer, which scores 0.
`normalize` then strips spaces, `$`, a trailing period, thousands commas and letter case, and writes a number in one
canonical form (`72.0`, `72`, `072` are all `72`), so `exact` compares normalized answers.

Verifiers (`judge.verifier`):
- `exact`: 1 if the normalized final answers are equal, else 0;
- `math`: symbolic equivalence by `math-verify` (the response parsed as `math-verify` extracts answers: LaTeX,
  `\\boxed{}`, plain numbers; the reference's final answer by the rule above);
- `python:<module>:<function>`: the user's `function(prompt, response, answer) -> float`, imported from `<module>`
  (importable from the project root) only when named.
An optional format reward adds `judge.format_weight` when the response matches `judge.format_pattern` (a regex
searched anywhere in the response).

Every check runs in a worker process (`python -m pipeline.models.verifiers`, JSON lines on stdin and stdout) and is
bounded by `judge.timeout_s`: a check that has not answered by then scores 0, is counted (`Verifier.timeouts`),
and its worker is killed and replaced, so a hanging checker (a catastrophic regex, an endless loop in user code)
never stalls a stage.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import select
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from pipeline.config.named import import_named

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
BUILTIN = ("exact", "math")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None  # unbalanced: no answer from this rule


def final_answer(text: str) -> str | None:
    """The final answer of `text` by the module's rule, or None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """One spelling per answer: no spaces, `$`, trailing period, thousands commas or case; numbers canonical."""
    text = answer.strip().strip("$").strip().rstrip(".").strip().lower()
    if NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
        if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return re.sub(r"\s+", " ", text)


def exact_score(prompt: str, response: str, answer: str) -> float:
    got, want = final_answer(response), final_answer(answer) or answer
    return float(got is not None and normalize(got) == normalize(want))


def math_score(prompt: str, response: str, answer: str) -> float:
    from math_verify import parse, verify

    gold = parse(f"${final_answer(answer) or answer}$")
    return float(bool(gold) and verify(gold, parse(response)))


def load_checker(name: str) -> Callable[[str, str, str], float]:
    """The check `judge.verifier` names. Raises ValueError naming the key when it cannot be imported."""
    if name == "exact":
        return exact_score
    if name == "math":
        try:
            importlib.import_module("math_verify")
        except ImportError as error:
            raise ValueError(
                f"judge.verifier: 'math' needs the math-verify package ({error}); pip install "
                "math-verify, or use judge.verifier: exact"
            ) from None
        return math_score
    return import_named(name, "judge.verifier", "exact, math")


class Verifier:
    """Scores responses against reference answers through a worker process, each check bounded in time.

    Args:
        name: `judge.verifier`.
        timeout_s: `judge.timeout_s`, per check.
        format_pattern, format_weight: the optional format reward (`judge.format_pattern`, `judge.format_weight`).
        cwd: where the worker runs (the project root: `python:` modules are imported from there).
    """

    def __init__(
        self,
        name: str,
        timeout_s: float,
        format_pattern: str | None = None,
        format_weight: float = 0.0,
        cwd: str | None = None,
    ) -> None:
        self.name, self.timeout_s, self.cwd = name, timeout_s, cwd
        self.format = re.compile(format_pattern) if format_pattern else None
        self.format_weight = format_weight
        self.timeouts = 0
        self._worker: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.models.verifiers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=self.cwd,
            text=True,
        )
        assert self._worker.stdin is not None
        self._worker.stdin.write(json.dumps(self.name) + "\n")  # the first line names the checker
        self._worker.stdin.flush()
        ready = self._reply(timeout=120)  # the worker's imports (math-verify's sympy) take a few seconds
        if ready is None or "error" in ready:
            self.close()
            raise ValueError(ready["error"] if ready else f"judge.verifier: the {self.name!r} worker did not start")

    def _reply(self, timeout: float) -> dict | None:
        assert self._worker is not None and self._worker.stdout is not None
        readable, _, _ = select.select([self._worker.stdout], [], [], timeout)
        line = self._worker.stdout.readline() if readable else ""
        return json.loads(line) if line else None

    def check(self, prompt: str, response: str, answer: str) -> float:
        """The correctness score of one response (0 when the check timed out)."""
        assert self._worker is not None and self._worker.stdin is not None
        self._worker.stdin.write(json.dumps([prompt, response, answer]) + "\n")
        self._worker.stdin.flush()
        reply = self._reply(self.timeout_s)
        if reply is None:  # hung (or died): replace the worker, score 0, count it
            self.timeouts += 1
            self.close()
            self._start()
            return 0.0
        if "error" in reply:
            raise ValueError(f"judge.verifier {self.name!r} raised on a response: {reply['error']}")
        return reply["score"]

    def score(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Each response's check plus its format reward."""
        return self.with_format(
            [self.check(p, r, a) for p, r, a in zip(prompts, responses, answers, strict=True)], responses
        )

    def with_format(self, scores: Sequence[float], responses: Sequence[str]) -> list[float]:
        """`scores` plus `format_weight` for each response matching `format_pattern`."""
        if self.format is None or not self.format_weight:
            return list(scores)
        return [s + self.format_weight * bool(self.format.search(r)) for s, r in zip(scores, responses, strict=True)]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the subprocess machinery may be gone already
            self.close()


def lookup_answers(answers: Mapping[str, str], prompts: Sequence[str]) -> list[str]:
    """Each prompt's reference answer; a prompt without one is an error naming it."""
    missing = [p for p in prompts if p not in answers]
    if missing:
        raise KeyError(f"no reference answer for prompt {missing[0]!r} ({len(missing)} of {len(prompts)} missing)")
    return [answers[p] for p in prompts]


def _serve() -> None:
    """The worker: read the checker's name, load it, say so, then answer one JSON line per check."""
    name = json.loads(sys.stdin.readline())
    try:
        checker = load_checker(name)
    except ValueError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        prompt, response, answer = json.loads(line)
        try:
            reply = {"score": float(checker(prompt, response, answer))}
        except Exception as error:  # noqa: BLE001 - the user's function failed: the parent raises it, named
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve()
