"""Before/after evaluation: refusals, over-refusals and utility (WARP.md, "Evaluation protocol").

Every prompt is rendered with `data.encode_prompt`, the exact prefix the model was trained on,
so a score never reflects a format mismatch (the reference's training and evaluation formats
differed); a chat example's prompt is its conversation before its last assistant turn.
Decoding is greedy, so two evaluations of the same weights agree token for token.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from warp_core.attacks import ATTACKS, WORST_ATTACK_METRIC, attack_metric, attacked
from warp_core.data import (
    Example,
    Prompt,
    batches,
    encode_examples,
    encode_prompt,
    pad_token_id,
)
from warp_core.events import OnBatch
from warp_core.judge import (
    KEYWORD_RULE,
    Judge,
    KeywordJudge,
    judge_record,
    load_judge,
)
from warp_core.judge import (  # re-exported: where the keyword rule used to live
    REFUSAL_PHRASES as REFUSAL_PHRASES,
)
from warp_core.judge import (
    REFUSAL_WINDOW_TOKENS as REFUSAL_WINDOW_TOKENS,
)
from warp_core.judge import (
    is_refusal as is_refusal,
)
from warp_core.loss import mean_response_loss
from warp_core.spec import EvalSpec

REFUSAL_RULE = KEYWORD_RULE
"""The keyword judge's description, under its former name (readers of old metrics)."""

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_MARKERS = (re.compile(r"####"), re.compile(r"the answer is", re.IGNORECASE))
_CODE_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the model's (chat models often stop on several tokens)."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return sorted({i for i in ids if i is not None})


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the last column, where generation starts."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _until_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Drop the first EOS and everything after it (finished rows are padded by `generate`)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int,
    on_batch: OnBatch = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (generated ids only, cut before the first EOS).

    Sampling parameters are overridden with None: a chat model's generation_config often sets
    a temperature or top_p, which greedy decoding ignores and some versions warn about.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    continuations: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        input_ids, attention_mask = _left_pad(rows, pad_id)
        with torch.no_grad():  # not inference_mode: FSDP2 reuses the buffers it gathers into
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                # a sharded model: every rank steps until all are done (FSDP2 forwards
                # gather weights from all ranks)
                synced_gpus=_sharded(),
            )
        new_ids = output[:, input_ids.shape[1] :].tolist()
        continuations.extend(_until_eos(ids, eos_ids) for ids in new_ids)
        if on_batch is not None:
            on_batch()
    return continuations


def _sharded() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _recorded(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt as a sample shows it: its text, or a conversation's messages."""
    return prompt if isinstance(prompt, str) else [turn.message() for turn in prompt]


def _mean(flags: Sequence[bool]) -> float:
    if not flags:
        raise ValueError("cannot compute a rate over an empty evaluation set")
    return sum(flags) / len(flags)


def _judged_text(prompt: Prompt) -> str:
    """What a judge reads as the prompt: the text, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((turn.content for turn in reversed(prompt) if turn.role == "user"), "")


def refusal_rate(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    generations: Sequence[list[int]],
    judge: Judge | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of prompts refused according to `judge` (default: the keyword rule), with
    every response for inspection.

    `generations` are the greedy continuations of `prompts` (or of the prompts wrapped in an
    attack: the judge reads the request, as HarmBench's classifier does), from `generate`
    with at most `eval.max_new_tokens` new tokens. A judge that reads a window of the
    response (`window_tokens`) is given that many generated tokens, decoded.
    """
    judge = judge or KeywordJudge()
    responses = [_decode(tokenizer, ids) for ids in generations]
    window = judge.window_tokens
    judged = (
        responses if window is None else [_decode(tokenizer, ids[:window]) for ids in generations]
    )
    verdicts = judge.refusals([_judged_text(prompt) for prompt in prompts], judged)
    samples = [
        {"prompt": _recorded(prompt), "response": response, "refused": bool(refused)}
        for prompt, response, refused in zip(prompts, responses, verdicts, strict=True)
    ]
    return _mean([sample["refused"] for sample in samples]), samples


REFUSAL_METRICS = ("refusal_rate", "over_refusal_rate", "contrast_refusal_rate")
"""The metrics a judge's verdicts make, besides those of `eval.attacks`; loss and task
accuracy do not depend on it."""


def refusal_metrics(spec: EvalSpec) -> list[str]:
    """Every rate the judge decides for an evaluation under `spec`, attacks included."""
    under_attack = [attack_metric(name) for name in spec.attacks]
    return [*REFUSAL_METRICS, *under_attack, *([WORST_ATTACK_METRIC] if under_attack else [])]


def refusal_record(spec: EvalSpec, judge: Judge | None = None) -> dict[str, Any]:
    """What a job's metrics.json says about its refusal rates: `refusal_rule` (the judge's
    description, the key readers have always used) and `refusal_judge` (its name and
    description, and the rates it produced). `judge`, if given, is the one `spec` named;
    otherwise it is built here, which for a model judge reads its config, not its weights."""
    judge = judge or load_judge(spec.judge)
    return {
        "refusal_rule": judge.description,
        "refusal_judge": {**judge_record(judge), "rates": refusal_metrics(spec)},
    }


def response_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int,
    on_batch: OnBatch = None,
) -> float:
    """Mean cross-entropy per response token, in float32.

    Token-weighted (total loss / total label tokens) so the value does not depend on the batch
    size or on how examples of different lengths fall into batches.
    """
    encoded, _ = encode_examples(tokenizer, examples, max_length)
    if not encoded:
        raise ValueError(f"no example keeps a response token within max_length={max_length}")
    batches_ = list(batches(encoded, batch_size, pad_token_id(tokenizer)))
    return mean_response_loss(model, batches_, on_batch=on_batch)


def _normalise_number(text: str) -> str:
    """Canonical form of a number so that "$1,234.00" and "1234" compare equal.

    `_NUMBER` never captures surrounding spaces or a sentence's final period.
    """
    number = text.replace(",", "").replace("$", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last `####`, else after the last "The answer is"; None if absent."""
    for marker in _ANSWER_MARKERS:
        positions = [match.end() for match in marker.finditer(text)]
        if not positions:
            continue
        number = _NUMBER.search(text, positions[-1])
        if number is not None:
            return _normalise_number(number.group())
    return None


def grade_gsm8k(example: Example, response: str) -> dict[str, Any]:
    """Exact match of the final number against `example.meta["answer"]`'s."""
    prediction = gsm8k_final_answer(response)
    reference = gsm8k_final_answer(example.meta["answer"])
    return {
        "prediction": prediction,
        "reference": reference,
        "correct": prediction is not None and prediction == reference,
    }


def extract_code(text: str) -> str:
    """The body of the first python (or bare) code fence, else the whole text.

    An unclosed fence runs to the end: generations are often cut by max_new_tokens.
    """
    match = _CODE_FENCE.search(text)
    return match.group(1) if match else text


_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


def _isolate_network() -> None:
    """Move this process into a network namespace of its own: no interfaces, no loopback
    peers, no network. An unprivileged user needs user namespaces for it; root does not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0 and libc.unshare(_CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, "cannot isolate generated code from the network (unshare)")


def _limit_resources(timeout_s: float) -> None:
    """Runs in the child before exec: no network; bound memory, CPU time and files; no core
    dumps. If the network cannot be cut off, the program is not run at all."""
    _isolate_network()
    cpu_s = math.ceil(timeout_s)
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def _run_python(source: str, timeout_s: float) -> bool:
    """Whether `source` exits with status 0 within `timeout_s`, in a throwaway directory.

    This contains accidents and the obvious abuse (loops, memory blow-ups, stray files,
    network access); the child still runs as the worker's user, so run workers as an
    unprivileged user in a container.
    """
    with tempfile.TemporaryDirectory(prefix="warp-mbpp-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(source, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
        with subprocess.Popen(
            [sys.executable, "-I", str(script)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _limit_resources(timeout_s),
            start_new_session=True,
        ) as process:
            try:
                return process.wait(timeout=timeout_s) == 0
            except subprocess.TimeoutExpired:
                # The whole session: the program may have started children of its own.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return False


def run_mbpp_tests(
    code: str, test_setup_code: str, tests: Sequence[str], timeout_s: float = 10.0
) -> bool:
    """Whether `code` passes every MBPP assert, each run in its own fresh interpreter."""
    program = f"{code}\n{test_setup_code}\n"
    return all(_run_python(program + test + "\n", timeout_s) for test in tests)


def grade_mbpp(example: Example, response: str) -> dict[str, Any]:
    """Whether the code of the response passes all of the problem's tests (pass@1 of a
    single greedy solution)."""
    passed = run_mbpp_tests(
        extract_code(response), example.meta.get("test_setup_code", ""), example.meta["test_list"]
    )
    return {"passed": passed}


@dataclass(frozen=True)
class UtilityTask:
    """A utility preset's task checker: `grade` adds fields to a sample, among them
    `verdict`, the flag whose mean is the metric `metric`."""

    metric: str
    grade: Callable[[Example, str], dict[str, Any]]
    verdict: str


UTILITY_TASKS: dict[str, UtilityTask] = {
    "gsm8k": UtilityTask("gsm8k_accuracy", grade_gsm8k, "correct"),
    "mbpp": UtilityTask("mbpp_pass_at_1", grade_mbpp, "passed"),
}
"""Utility presets with a task checker."""


def utility_score(
    preset: str, tokenizer: Any, examples: Sequence[Example], generations: Sequence[list[int]]
) -> tuple[float, list[dict[str, Any]]]:
    """The preset's metric, with the graded samples; `generations` are the greedy answers to
    the examples' prompts, from `generate`."""
    task = UTILITY_TASKS[preset]
    samples = []
    for example, ids in zip(examples, generations, strict=True):
        response = _decode(tokenizer, ids)
        samples.append(
            {"prompt": example.prompt, "response": response, **task.grade(example, response)}
        )
    return _mean([sample[task.verdict] for sample in samples]), samples


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Evaluate without dropout, then give the caller back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(
    model: Any,
    tokenizer: Any,
    harmful: list[Example],
    benign: list[Example],
    utility: list[Example],
    utility_preset: str | None,
    spec: EvalSpec,
    max_length: int,
    batch_size: int,
    on_batch: OnBatch = None,
    contrast: list[Example] | None = None,
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """All metrics of one checkpoint, and the generations behind them.

    `refusal_rate` is taken on `harmful`, `over_refusal_rate` on `benign` (a job's default:
    XSTest's safe prompts) and, when `contrast` is given (default: XSTest's unsafe contrast
    prompts), `contrast_refusal_rate` on it. Each of `spec.attacks` asks `harmful` again,
    wrapped in its template (`warp_core.attacks`): `refusal_rate_under_<attack>`, and the
    lowest of them `worst_attack_refusal_rate`; their samples are `attack:<name>`.

    Refusal rates come from the judge `spec.judge` names (`refusal_record` says which, for
    metrics.json). Task accuracy is added only for presets with a checker (GSM8K, MBPP); the
    response loss is always reported because it is the only utility signal that moves on
    tiny models.
    """

    def answers(examples: list[Example], max_new_tokens: int) -> list[list[int]]:
        prompts = [example.prompt for example in examples]
        return generate(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch)

    judge = load_judge(spec.judge, device=next(model.parameters()).device)

    def refusals(examples: list[Example]) -> tuple[float, list[dict[str, Any]]]:
        prompts = [example.prompt for example in examples]
        return refusal_rate(tokenizer, prompts, answers(examples, spec.max_new_tokens), judge)

    with _eval_mode(model):
        refusal, harmful_samples = refusals(harmful)
        over_refusal, benign_samples = refusals(benign)
        metrics = {"refusal_rate": refusal, "over_refusal_rate": over_refusal}
        contrast_samples: list[dict[str, Any]] = []
        if contrast is not None:
            metrics["contrast_refusal_rate"], contrast_samples = refusals(contrast)
        attack_samples = {}
        requests = [example.prompt for example in harmful]
        for name in spec.attacks:
            wrapped = [replace(e, prompt=attacked(e.prompt, ATTACKS[name])) for e in harmful]
            generations = answers(wrapped, spec.max_new_tokens)
            rate, judged = refusal_rate(tokenizer, requests, generations, judge)
            metrics[attack_metric(name)] = rate
            attack_samples[f"attack:{name}"] = [
                {**sample, "attacked_prompt": _recorded(example.prompt)}
                for example, sample in zip(wrapped, judged, strict=True)
            ]
        if spec.attacks:
            metrics[WORST_ATTACK_METRIC] = min(metrics[attack_metric(n)] for n in spec.attacks)
        metrics["utility_loss"] = response_loss(
            model, tokenizer, utility, max_length, batch_size, on_batch
        )
        utility_samples: list[dict[str, Any]] = []
        if utility_preset in UTILITY_TASKS:
            generations = answers(utility, spec.utility_max_new_tokens)
            score, utility_samples = utility_score(utility_preset, tokenizer, utility, generations)
            metrics[UTILITY_TASKS[utility_preset].metric] = score
    samples = {"harmful": harmful_samples, "benign": benign_samples}
    if contrast is not None:
        samples["contrast"] = contrast_samples
    samples |= attack_samples
    samples["utility"] = utility_samples
    return metrics, samples
