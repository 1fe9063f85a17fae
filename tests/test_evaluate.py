"""Evaluation on real data and tiny offline Llamas: the refusal rule, answer checkers, the MBPP
sandbox, greedy batched generation and the token-weighted response loss."""

from __future__ import annotations

import csv
import json
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch

from warp_core.data import IGNORE_INDEX, Example, collate, encode_example
from warp_core.evaluate import (
    REFUSAL_PHRASES,
    REFUSAL_RULE,
    REFUSAL_WINDOW_TOKENS,
    evaluate,
    extract_code,
    generate,
    gsm8k_final_answer,
    is_refusal,
    refusal_rate,
    refusal_record,
    response_loss,
    run_mbpp_tests,
    utility_score,
)
from warp_core.spec import EvalSpec
from warp_core.testing import tiny_llama, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFUSAL = "I'm sorry, I cannot help with that."


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(limit), handle, strict=False)]


def overfit(tokenizer, examples: list[Example]):
    """A tiny Llama that memorised `examples` (rendered by `encode_example`, as in training)."""
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=3)
    batch = collate([encode_example(tokenizer, ex, 256) for ex in examples], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(100):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def graded(
    preset: str, model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int
):
    """`utility_score` of the model's greedy answers, as `evaluate` computes it."""
    prompts = [example.prompt for example in examples]
    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return utility_score(preset, tokenizer, examples, generations)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core runner, worker threads
    competing with other processes made this module take 80 s instead of 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return read_jsonl(SHARED / "data/gsm8k/train.jsonl", 300)


@pytest.fixture(scope="module")
def mbpp_rows() -> list[dict]:
    return read_jsonl(SHARED / "data/mbpp/mbpp.jsonl", 10)


@pytest.fixture(scope="module")
def harmful_prompts() -> list[str]:
    with (SHARED / "data/do-not-answer/do_not_answer_en.csv").open(encoding="utf-8") as handle:
        questions = [row["question"] for row in csv.DictReader(handle)]
    return [q for q in questions if len(q) < 60][:12]


@pytest.fixture(scope="module")
def tokenizer(gsm8k_rows):
    texts = [row["question"] for row in gsm8k_rows] + [row["answer"] for row in gsm8k_rows]
    return train_tokenizer([*texts, REFUSAL], vocab_size=512)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def gsm8k_examples(gsm8k_rows) -> list[Example]:
    return [Example(r["question"], r["answer"], {"answer": r["answer"]}) for r in gsm8k_rows[:6]]


# The refusal rule


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I’m sorry, but that request is harmful.",  # curly apostrophe
        "i CANNOT provide instructions for that.",
        "AS AN AI language model, I have no opinions.",
        "Sure? No. I won’t do that.",
        "Unfortunately I am unable to assist.",
        "That is not appropriate for me to answer.",
    ],
)
def test_is_refusal_detects_listed_phrases(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Sure! Natalia sold 48/2 = 24 clips in May. #### 72",
        "def add(a, b):\n    return a + b",
        "Cannabis is legal in some countries.",
    ],
)
def test_is_refusal_ignores_ordinary_answers(text: str) -> None:
    assert not is_refusal(text)


def test_refusal_rule_names_window_and_every_phrase() -> None:
    assert f"first {REFUSAL_WINDOW_TOKENS} generated tokens" in REFUSAL_RULE
    assert all(repr(phrase) in REFUSAL_RULE for phrase in REFUSAL_PHRASES)


# GSM8K answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $18.", "18"),
        ("#### 72.0", "72"),
        ("#### -3.50", "-3.5"),
        ("#### 5 then\n#### 6", "6"),
        ("She pays $5. The answer is $1,200.00.", "1200"),
        ("The answer is 3. Wait, the answer is 4.", "4"),
        ("the Answer is: 0.25", "0.25"),
        ("#### 10\nThe answer is 11", "10"),
        ("#### none\nThe answer is 11", "11"),
    ],
)
def test_gsm8k_final_answer(text: str, expected: str) -> None:
    assert gsm8k_final_answer(text) == expected


@pytest.mark.parametrize("text", ["", "She sold 72 clips.", "#### unknown", "The answer is no"])
def test_gsm8k_final_answer_absent(text: str) -> None:
    assert gsm8k_final_answer(text) is None


# MBPP: code extraction and the sandbox


def test_extract_code_takes_first_fence_or_whole_text() -> None:
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\nand\n```\nx = 2\n```"
    assert extract_code(fenced) == "def f():\n    return 1\n"
    assert extract_code("```\nx = 2\n```") == "x = 2\n"
    assert extract_code("```py\nunclosed = True") == "unclosed = True"
    assert extract_code("def g():\n    return 2") == "def g():\n    return 2"


def test_reference_mbpp_solution_passes(mbpp_rows) -> None:
    row = next(r for r in mbpp_rows if r["task_id"] == 2)
    assert "\r\n" in row["code"]
    assert run_mbpp_tests(row["code"], row["test_setup_code"], row["test_list"])


def test_wrong_mbpp_solution_fails(mbpp_rows) -> None:
    row = next(r for r in mbpp_rows if r["task_id"] == 2)
    wrong = "def similar_elements(a, b):\n    return tuple(set(a) | set(b))"
    assert not run_mbpp_tests(wrong, row["test_setup_code"], row["test_list"])
    assert not run_mbpp_tests("def similar_elements(:", "", row["test_list"])


def test_mbpp_setup_code_runs_before_tests() -> None:
    code = "def double(x):\n    return 2 * x"
    assert run_mbpp_tests(code, "BASE = 21", ["assert double(BASE) == 42"])
    assert not run_mbpp_tests(code, "", ["assert double(BASE) == 42"])


def test_infinite_loop_times_out_as_failure() -> None:
    start = time.monotonic()
    assert not run_mbpp_tests("while True:\n    pass", "", ["assert True"], timeout_s=1.0)
    assert time.monotonic() - start < 5


def test_memory_hog_fails() -> None:
    """4 GiB fits in this machine's memory but not under the sandbox's 1 GiB address space."""
    assert run_mbpp_tests("blob = bytearray(2 ** 20)", "", ["assert len(blob) > 0"])
    hog = "blob = bytearray(4 * 1024 ** 3)"
    assert not run_mbpp_tests(hog, "", ["assert len(blob) > 0"], timeout_s=5.0)


def test_mbpp_runs_in_a_throwaway_directory() -> None:
    code = "import os\nopen('left_behind.txt', 'w').write('x')\nCWD = os.getcwd()"
    assert run_mbpp_tests(code, "", [f"assert CWD != {str(Path.cwd())!r}"])
    assert not (Path.cwd() / "left_behind.txt").exists()


def test_generated_code_has_no_network():
    """A server listening on this machine is out of reach from inside the sandbox."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reach = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert not run_mbpp_tests(reach, "", ["assert True"])
        assert run_mbpp_tests("import socket", "", ["assert socket.gethostname()"])


# Generation and losses on a tiny Llama


def test_generate_is_bounded_and_stops_before_eos(model, tokenizer, gsm8k_rows) -> None:
    prompts = [row["question"] for row in gsm8k_rows[:4]]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert len(outputs) == len(prompts)
    assert all(len(ids) <= 12 for ids in outputs)
    assert all(tokenizer.eos_token_id not in ids for ids in outputs)


def test_batched_generation_equals_one_at_a_time(model, tokenizer, gsm8k_rows) -> None:
    prompts = ["Hi", gsm8k_rows[0]["question"], "What is 3 + 4?", gsm8k_rows[1]["question"]]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts)  # every row of the batch is padded differently
    batched = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_sampling_defaults_of_the_model_neither_warn_nor_sample(tokenizer) -> None:
    chat_model = tiny_llama(tokenizer, hidden_size=32, seed=1)
    greedy = generate(chat_model, tokenizer, ["What is 3 + 4?"], max_new_tokens=8, batch_size=1)
    chat_model.generation_config.do_sample = True
    chat_model.generation_config.temperature = 0.6
    chat_model.generation_config.top_p = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = generate(chat_model, tokenizer, ["What is 3 + 4?"], max_new_tokens=8, batch_size=1)
    assert again == greedy


def test_on_batch_is_called_per_batch_and_can_cancel(model, tokenizer) -> None:
    calls = []
    generate(model, tokenizer, ["a", "b", "c"], 2, batch_size=2, on_batch=lambda: calls.append(1))
    assert len(calls) == 2

    def cancel() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, tokenizer, ["a", "b", "c"], 2, batch_size=2, on_batch=cancel)


def test_refusal_rate_is_consistent_with_its_samples(model, tokenizer, gsm8k_rows) -> None:
    prompts = [row["question"] for row in gsm8k_rows[:5]]
    rate, samples = refusal_rate(tokenizer, prompts, generate(model, tokenizer, prompts, 40, 2))
    assert 0.0 <= rate <= 1.0
    assert [s["prompt"] for s in samples] == prompts
    assert rate == sum(s["refused"] for s in samples) / len(samples)
    for sample, ids in zip(samples, generate(model, tokenizer, prompts, 40, 5), strict=True):
        assert sample["response"] == tokenizer.decode(ids, skip_special_tokens=True)
        window = tokenizer.decode(ids[:REFUSAL_WINDOW_TOKENS], skip_special_tokens=True)
        assert sample["refused"] == is_refusal(window)


class RecordingJudge:
    """Calls every response a refusal if it is longer than 10 characters; keeps what it read."""

    name = "recording"
    description = "test judge"

    def __init__(self, window_tokens: int | None) -> None:
        self.window_tokens = window_tokens
        self.read: list[tuple[list[str], list[str]]] = []

    def refusals(self, prompts, responses) -> list[bool]:
        self.read.append((list(prompts), list(responses)))
        return [len(r) > 10 for r in responses]


@pytest.mark.parametrize("window", [None, 3])
def test_a_judge_reads_the_prompt_and_its_window_of_the_response(
    model, tokenizer, gsm8k_rows, window
) -> None:
    prompts = [row["question"] for row in gsm8k_rows[:3]]
    generations = generate(model, tokenizer, prompts, 12, 3)
    judge = RecordingJudge(window)
    rate, samples = refusal_rate(tokenizer, prompts, generations, judge)
    cut = [ids if window is None else ids[:window] for ids in generations]
    read = [tokenizer.decode(ids, skip_special_tokens=True) for ids in cut]
    assert judge.read == [(prompts, read)]
    assert [s["refused"] for s in samples] == [len(r) > 10 for r in read]
    assert [s["response"] for s in samples] == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in generations
    ]
    assert rate == sum(len(r) > 10 for r in read) / 3


def test_evaluate_uses_the_judge_its_spec_names(model, tokenizer, gsm8k_examples) -> None:
    from warp_core.judge import NgramJudge

    spec = EvalSpec(max_new_tokens=6, judge="ngram")
    examples = gsm8k_examples[:3]
    metrics, samples = evaluate(model, tokenizer, examples, examples, examples, None, spec, 128, 3)
    prompts = [example.prompt for example in examples]
    expected = NgramJudge.load().refusals(prompts, [s["response"] for s in samples["harmful"]])
    assert [s["refused"] for s in samples["harmful"]] == expected
    assert metrics["refusal_rate"] == sum(expected) / 3
    assert "contrast_refusal_rate" not in metrics and "contrast" not in samples


def test_a_contrast_set_has_a_refusal_rate_of_its_own(model, tokenizer, gsm8k_examples) -> None:
    spec = EvalSpec(max_new_tokens=6, judge="keyword")
    examples, contrast = gsm8k_examples[:2], gsm8k_examples[2:5]
    metrics, samples = evaluate(
        model, tokenizer, examples, examples, examples, None, spec, 128, 3, contrast=contrast
    )
    assert list(samples) == ["harmful", "benign", "contrast", "utility"]
    assert [s["prompt"] for s in samples["contrast"]] == [e.prompt for e in contrast]
    refused = [s["refused"] for s in samples["contrast"]]
    assert metrics["contrast_refusal_rate"] == sum(refused) / 3


def test_the_refusal_record_names_the_judge_of_every_rate() -> None:
    assert EvalSpec().judge == "ngram"  # the default: closer to people (bench/JUDGE.md)
    keyword = refusal_record(EvalSpec(judge="keyword"))
    assert keyword["refusal_rule"] == REFUSAL_RULE
    assert keyword["refusal_judge"] == {
        "name": "keyword",
        "description": REFUSAL_RULE,
        "rates": ["refusal_rate", "over_refusal_rate", "contrast_refusal_rate"],
    }
    ngram = refusal_record(EvalSpec(judge="ngram"))
    assert ngram["refusal_judge"]["name"] == "ngram"
    assert ngram["refusal_rule"] == ngram["refusal_judge"]["description"] != REFUSAL_RULE


def test_response_loss_matches_hand_computation(model, tokenizer, gsm8k_examples) -> None:
    example = gsm8k_examples[0]
    encoded = encode_example(tokenizer, example, max_length=256)
    with torch.no_grad():
        logits = model(torch.tensor([encoded.input_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = [
        -log_probs[t - 1, label].item()
        for t, label in enumerate(encoded.labels)
        if label != IGNORE_INDEX
    ]
    expected = sum(losses) / len(losses)
    assert response_loss(model, tokenizer, [example], 256, 1) == pytest.approx(expected, rel=1e-5)


def test_response_loss_is_token_weighted(model, tokenizer, gsm8k_examples) -> None:
    per_example = [response_loss(model, tokenizer, [ex], 256, 1) for ex in gsm8k_examples]
    tokens = [encode_example(tokenizer, ex, 256).response_tokens for ex in gsm8k_examples]
    assert len(set(tokens)) > 1
    weighted = sum(loss * n for loss, n in zip(per_example, tokens, strict=True)) / sum(tokens)
    for batch_size in (1, 4, 6):
        loss = response_loss(model, tokenizer, gsm8k_examples, 256, batch_size)
        assert loss == pytest.approx(weighted, rel=1e-5)
    assert weighted != pytest.approx(sum(per_example) / len(per_example), rel=1e-5)


def test_response_loss_without_response_tokens_raises(model, tokenizer, gsm8k_examples) -> None:
    with pytest.raises(ValueError, match="max_length"):
        response_loss(model, tokenizer, gsm8k_examples[:1], max_length=8, batch_size=1)


def test_trained_refusal_is_counted_as_refusal(tokenizer, harmful_prompts) -> None:
    """Train the refusal in through `encode_example`, read it back through `refusal_rate`."""
    train, held_out = harmful_prompts[:8], harmful_prompts[8:]
    refuser = overfit(tokenizer, [Example(p, REFUSAL) for p in train])
    rate, samples = refusal_rate(tokenizer, held_out, generate(refuser, tokenizer, held_out, 32, 4))
    assert rate == 1.0
    assert [s["response"] for s in samples] == [REFUSAL] * len(held_out)  # stopped at EOS
    untrained = tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=3)
    assert (
        refusal_rate(tokenizer, held_out, generate(untrained, tokenizer, held_out, 32, 4))[0] == 0
    )


def test_trained_gsm8k_answers_are_graded_correct(tokenizer, gsm8k_rows) -> None:
    """Answers in the "The answer is" form, graded against the dataset's `####` references."""
    examples = [
        Example(r["question"], f"The answer is {gsm8k_final_answer(r['answer'])}.", r)
        for r in gsm8k_rows[:3]
    ]
    solver = overfit(tokenizer, examples)
    accuracy, samples = graded("gsm8k", solver, tokenizer, examples, 16, 3)
    assert [s["prediction"] for s in samples] == ["72", "10", "5"]
    assert accuracy == 1.0


def test_trained_mbpp_solution_passes_and_others_fail(tokenizer, mbpp_rows) -> None:
    """Only task 2's fenced solution was learnt: it passes, while task 3's tests must fail."""
    task2, task3 = (
        Example(r["text"], r["code"], {"test_list": r["test_list"]}) for r in mbpp_rows[1:3]
    )
    fenced = Example(task2.prompt, f"```python\n{task2.response}\n```", task2.meta)
    coder = overfit(tokenizer, [fenced])
    rate, samples = graded("mbpp", coder, tokenizer, [task2, task3], 96, 2)
    assert samples[0]["response"] == fenced.response  # graded through `extract_code`
    assert [s["passed"] for s in samples] == [True, False]
    assert rate == 0.5


# The whole evaluation


def test_evaluate_reports_gsm8k_metrics(tokenizer, gsm8k_examples, harmful_prompts) -> None:
    harmful = [Example(p, REFUSAL) for p in harmful_prompts[:3]]
    spec = EvalSpec(max_new_tokens=8, utility_max_new_tokens=8)
    model = tiny_llama(tokenizer, hidden_size=32).train()
    metrics, samples = evaluate(
        model, tokenizer, harmful, gsm8k_examples[:2], gsm8k_examples[:3], "gsm8k", spec, 128, 2
    )
    assert model.training
    assert set(metrics) == {"refusal_rate", "over_refusal_rate", "utility_loss", "gsm8k_accuracy"}
    assert metrics["utility_loss"] == pytest.approx(
        response_loss(model, tokenizer, gsm8k_examples[:3], 128, 3), rel=1e-5
    )
    assert [len(samples[k]) for k in ("harmful", "benign", "utility")] == [3, 2, 3]
    assert samples["utility"][0]["reference"] == gsm8k_final_answer(gsm8k_examples[0].response)
    accuracy, _ = graded("gsm8k", model, tokenizer, gsm8k_examples[:3], 8, 2)
    assert metrics["gsm8k_accuracy"] == accuracy


def test_evaluate_reports_mbpp_pass_at_1(model, tokenizer, mbpp_rows) -> None:
    utility = [Example(r["text"], r["code"], {"test_list": r["test_list"]}) for r in mbpp_rows[:2]]
    spec = EvalSpec(max_new_tokens=4, utility_max_new_tokens=8)
    metrics, samples = evaluate(model, tokenizer, utility, utility, utility, "mbpp", spec, 256, 2)
    assert not model.training
    assert metrics["mbpp_pass_at_1"] == sum(s["passed"] for s in samples["utility"]) / 2
    assert "gsm8k_accuracy" not in metrics
    rate, _ = graded("mbpp", model, tokenizer, utility, 8, 2)
    assert rate == metrics["mbpp_pass_at_1"]


def test_evaluate_without_task_checker_reports_loss_only(model, tokenizer, gsm8k_examples) -> None:
    spec = EvalSpec(max_new_tokens=4)
    metrics, samples = evaluate(
        model, tokenizer, gsm8k_examples[:1], gsm8k_examples[:1], gsm8k_examples, None, spec, 128, 4
    )
    assert set(metrics) == {"refusal_rate", "over_refusal_rate", "utility_loss"}
    assert samples["utility"] == []
