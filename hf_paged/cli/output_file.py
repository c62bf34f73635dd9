"""The ``--output`` file of ``hf-paged generate``: JSON lines, one record per prompt.

A record is ``{"index", "prompt", "outputs"}``, plus ``"name"`` for built-in prompts and ``"job"``
when the run has several jobs (the demo). Records are appended as each batch finishes (flushed), so
an interrupted run keeps what it computed and ``--resume`` continues it. Once the run completes,
the file is rewritten in input order (job order, then index) into a temporary file that replaces
it (``os.replace``): prompts finish out of order, the finished file is in prompt order.

A run on several processes (shards.py) writes one part file per process next to the output
(``out.jsonl.part-<rank>-of-<count>``); rank 0 merges them into the output at the end. ``--resume``
counts the records of the output and of every part file; the finished output absorbs them.

:func:`check_output_path` runs before anything heavy; :class:`OutputFile` does the rest.
"""

from __future__ import annotations

import json
import os
import tempfile


class OutputFileError(ValueError):
    """The output file cannot be used as asked (the message says why and what to do)."""


def check_output_path(path: str, *, resume: bool, overwrite: bool) -> None:
    """Fail at once, not after the work, when the results could not be written or would replace
    a file without ``--resume`` / ``--overwrite``."""
    if os.path.isdir(path):
        raise OutputFileError(f"--output '{path}' is a directory; give a file, e.g. '{os.path.join(path, 'out.jsonl')}'")
    if os.path.exists(path) and not os.path.isfile(path):
        raise OutputFileError(f"--output '{path}' is not a regular file")
    folder = _folder(path)
    if not os.path.isdir(folder):
        raise OutputFileError(f"--output '{path}': folder '{folder}' does not exist")
    if os.path.exists(path) and not (resume or overwrite):
        raise OutputFileError(
            f"--output '{path}' exists: --resume continues it (the prompts it holds are skipped), "
            "--overwrite replaces it"
        )
    from .shards import part_files

    parts = part_files(path)
    if parts and not (resume or overwrite):
        raise OutputFileError(
            f"'{parts[0]}' exists (the part file of an earlier run on several processes): --resume continues "
            f"that run, --overwrite replaces its results"
        )
    # Records are appended to the file, and the finished file replaces it from a temporary file
    # in the same folder: both must be possible.
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hf-paged-probe-")
    except OSError as e:
        raise OutputFileError(f"--output '{path}': cannot write in folder '{folder}' ({e.strerror})") from None
    os.close(fd)
    os.remove(probe)
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise OutputFileError(f"--output '{path}' cannot be read and written (permissions)")


def _folder(path: str) -> str:
    return os.path.dirname(path) or "."


def make_record(job, index: int, outputs: list[str], with_job: bool) -> dict:
    prompt = job.prompts[index]
    record = {"index": index, "prompt": prompt.text, "outputs": outputs}
    if prompt.name and prompt.kind != "text":  # built-in prompts: "chat/3", "HumanEval/0"
        record["name"] = prompt.name
    if with_job:
        record["job"] = job.name
    return record


def read_records(path: str) -> list[tuple[int, dict]]:
    """``(line number, record)`` of each record of an earlier run. A last line that is not
    complete JSON was cut short by a killed run: it is dropped (its prompt is computed again)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):  # after the last newline: a line cut short
                break
            raise OutputFileError(
                f"'{path}' line {number} is not JSON: not an hf-paged output file? --overwrite replaces it"
            ) from None
        if not (isinstance(record, dict) and isinstance(record.get("index"), int)
                and isinstance(record.get("prompt"), str) and "outputs" in record):
            raise OutputFileError(
                f"'{path}' line {number} is not an hf-paged record (\"index\", \"prompt\", \"outputs\"); "
                "--overwrite replaces the file"
            )
        records.append((number, record))
    return records


class OutputFile:
    """The records of one run's jobs, keyed by (job name or None for a run of one job, index).

    With ``resume``, the records already in the file are read (and checked against the jobs'
    prompts) and their prompts are :meth:`done`. The file is written only from the first finished
    batch on: a run that fails before computing anything leaves it as it was."""

    def __init__(self, path: str, jobs: list, *, resume: bool, others=()):
        self.path = path
        self.jobs = jobs
        self.with_job = len(jobs) > 1
        self.records: dict[tuple, dict] = {}
        # records of the earlier run in other files (the output, part files), done but not ours to write
        self.others: dict[tuple, dict] = {}
        self.other_paths = [p for p in others if os.path.exists(p)] if resume else []
        if resume and os.path.exists(path):
            for number, record in read_records(path):
                self.records[self._check_earlier(record, number)] = record
        for other in self.other_paths:
            for number, record in read_records(other):
                self.others[self._check_earlier(record, number, other)] = record
        self.resumed = len(self.records.keys() | self.others.keys())  # records of the earlier run
        self._file = None

    def _job_key(self, job) -> str | None:
        return job.name if self.with_job else None

    def _check_earlier(self, record: dict, number: int, path: str | None = None) -> tuple:
        """The key of an earlier record, whose prompt must be this run's prompt at its index."""
        jobs = {self._job_key(job): job for job in self.jobs}
        job_key, index = record.get("job"), record["index"]
        other = f"'{path or self.path}' was written for other prompts: its line {number}"
        fix = "; --overwrite replaces it, or choose another --output"
        if job_key not in jobs:
            where = f"is from job {job_key!r}, which this run does not have" if job_key is not None else \
                'has no "job" but this run has several jobs'
            raise OutputFileError(f"{other} {where}{fix}")
        prompts = jobs[job_key].prompts
        if not 0 <= index < len(prompts):
            raise OutputFileError(f"{other} has index {index} but this run has {len(prompts)} prompt(s){fix}")
        if record["prompt"] != prompts[index].text:
            raise OutputFileError(
                f"{other} holds prompt {_short(record['prompt'])!r} but this run's prompt {index} is "
                f"{_short(prompts[index].text)!r}{fix}"
            )
        return job_key, index

    def done(self, job) -> set[int]:
        """Indices of ``job``'s prompts already in the file."""
        key = self._job_key(job)
        return {index for job_key, index in self.records.keys() | self.others.keys() if job_key == key}

    def write_batch(self, result, indices: list[int]) -> None:
        """Append the records of a finished batch (``result``: its JobResult) and flush them."""
        if self._file is None:
            # The earlier records are written back first: this drops a line cut short (appending
            # after it would spoil the next record) and empties a file that --overwrite replaces.
            self._rewrite()
            self._file = open(self.path, "a", encoding="utf-8")
        for index in indices:
            record = make_record(result.job, index, result.outputs[index], self.with_job)
            self.records[self._job_key(result.job), index] = record
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> int:
        """The run completed: rewrite the file in input order, with the records of the other files
        (which are then removed: the output is their merge); returns the number of records."""
        self.close()
        for key, record in self.others.items():
            self.records.setdefault(key, record)
        self._rewrite()
        for other in self.other_paths:
            if os.path.abspath(other) != os.path.abspath(self.path):
                os.remove(other)
        self.others, self.other_paths = {}, []
        return len(self.records)

    def _rewrite(self) -> None:
        order = {self._job_key(job): n for n, job in enumerate(self.jobs)}
        keys = sorted(self.records, key=lambda key: (order[key[0]], key[1]))
        tmp = os.path.join(_folder(self.path), f".{os.path.basename(self.path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for key in keys:
                    f.write(json.dumps(self.records[key], ensure_ascii=False) + "\n")
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):  # the write failed: the file is as it was
                os.remove(tmp)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
