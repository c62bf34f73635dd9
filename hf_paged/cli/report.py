"""The closing reports: speed, and KV memory (paged vs what stock's dense cache holds)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .jobs import JobResult


def build_report(batch_stats: list[dict], *, prompts: int, sequences: int, new_tokens: int, wall_s: float,
                 stock: dict | None = None, skipped: int = 0, engine: dict | None = None) -> dict:
    """The closing report of one job: ``prompts`` computed in this run, ``skipped`` ones already in
    the output file. Memory figures are peaks over batches (batches run one after another; each
    batch's cache is freed before the next). ``engine``: the continuous-batching engine's figures
    (engine_jobs.engine_figures), for a job that ran on it instead of batches."""

    def peak(key):
        return max((int(s.get(key, 0)) for s in batch_stats), default=0)

    used, dense = peak("bytes_used"), peak("bytes_dense")
    report = {
        "prompts": prompts,
        "skipped": skipped,
        "sequences": sequences,
        "batches": len(batch_stats),
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": new_tokens / wall_s if wall_s > 0 else 0.0,
        "kv_bytes_used": used,
        "kv_bytes_reserved": peak("bytes_reserved"),
        "kv_bytes_dense": dense,
        "blocks_used": peak("blocks_used"),
        "blocks_shared": peak("blocks_shared"),
        "saving": dense / used if used else 0.0,
        "paged": all(s.get("paged", True) for s in batch_stats),
    }
    if engine is not None:
        report["engine"] = dict(engine)
    if stock is not None:
        report["stock"] = dict(stock)
        if stock.get("wall_s"):
            report["stock"]["tokens_per_s"] = stock.get("new_tokens", new_tokens) / stock["wall_s"]
    return report


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(report: dict, title: str = "") -> str:
    lines = []
    if title:
        lines.append(f"-- report: {title}")
    engine = report.get("engine")
    how = "continuous batching" if engine else f"{report['batches']} batch(es)"
    if engine and report["batches"]:
        how = f"continuous batching + {report['batches']} batch(es)"
    lines.append(
        f"   {report['prompts']} prompt(s), {report['sequences']} sequence(s), {how}: "
        f"{report['new_tokens']} new tokens in {report['wall_s']:.1f} s = {report['tokens_per_s']:.1f} tokens/s"
        + (f"; {report['skipped']} skipped (already in the output file)" if report.get("skipped") else "")
    )
    if engine:
        lines += _engine_lines(engine)
    if not report["batches"]:  # nothing ran in batches: no batch memory to report
        return "\n".join(lines + _stock_lines(report))
    if not report.get("paged", True):
        lines.append(f"   KV cache (peak over batches): stock dense cache {fmt_bytes(report['kv_bytes_used'])} "
                     "(not a paged cache: attn_implementation is not 'paged')")
    else:
        lines.append(
            f"   KV cache (peak over batches): paged used {fmt_bytes(report['kv_bytes_used'])} "
            f"({report['blocks_used']} blocks, {report['blocks_shared']} shared; pool reserved "
            f"{fmt_bytes(report['kv_bytes_reserved'])}) vs stock dense {fmt_bytes(report['kv_bytes_dense'])}"
            + _saving_text(report["saving"])
        )
    return "\n".join(lines + _stock_lines(report))


def _engine_lines(engine: dict) -> list[str]:
    rows, slots, steps = engine.get("decode_rows", 0), engine.get("decode_slots", 0), engine.get("decode_steps", 0)
    occupancy = f"{100 * rows / slots:.0f}% ({rows} rows / {slots} slots)" if slots else "n/a (no decode step)"
    cap = engine.get("max_blocks")
    pool = (f"pool cap {cap} blocks = {fmt_bytes(cap * engine['block_bytes'])}" if cap
            else "pool uncapped (--max-memory sets a cap)")
    dense = engine.get("dense_bytes")
    versus = ""
    if dense:
        versus = (f" vs stock dense {fmt_bytes(dense)} (the same prompts and outputs in batches of "
                  f"{engine.get('dense_batch_size')}, rows x padded length)" + _saving_text(dense / engine["peak_bytes"]
                                                                                       if engine.get("peak_bytes") else 0))
    return [
        f"   engine: {engine.get('steps', 0)} steps, {engine.get('new_tokens', 0)} tokens chosen, "
        f"{engine.get('prompt_tokens', 0)} prompt tokens prefilled, decode occupancy {occupancy}"
        + (f", {rows / steps:.1f} rows per decode step" if steps else "")
        + f", {engine.get('preemptions', 0)} preemption(s)",
        f"   KV cache (engine, peak{' of one process' if engine.get('per_process') else ''}): "
        f"{engine.get('peak_blocks', 0)} blocks of {engine.get('block_size', 0)} tokens = "
        f"{fmt_bytes(engine.get('peak_bytes', 0))}{versus}; {pool}",
    ]


def _stock_lines(report: dict) -> list[str]:
    lines = []
    stock = report.get("stock")
    if stock:
        eq = stock.get("tokens_equal")
        verdict = (
            "n/a (sampling)" if eq is None
            else "identical tokens" if eq
            else f"DIFFERENT tokens in {stock.get('mismatches')} of {report['sequences']} sequence(s)"
        )
        mode = f", {stock['mode']}" if stock.get("mode") else ""
        lines.append(
            f"   stock transformers (sdpa{mode}): {stock['wall_s']:.1f} s = {stock.get('tokens_per_s', 0):.1f} tokens/s, "
            f"KV cache measured {fmt_bytes(stock.get('kv_bytes', 0))}; paged vs stock: {verdict}"
        )
    return lines


def _saving_text(saving: float) -> str:
    if not saving:
        return ""
    if saving >= 1:
        return f" -> {saving:.2f}x less"
    return f" -> {1 / saving:.2f}x more (short rows in partly filled blocks)"


def _short(text: str, limit: int) -> str:
    text = text.replace("\r", "").replace("\n", "\\n")
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def print_outputs(result: JobResult, limit: int, file=None) -> None:
    file = file or sys.stdout
    if limit <= 0:
        return
    for i, (prompt, outs) in enumerate(zip(result.job.prompts, result.outputs)):
        if outs is None:  # skipped: already in the output file
            continue
        label = prompt.name if prompt.name else str(i)
        print(f"[{label}] {_short(prompt.text.strip(), limit // 2)}", file=file)
        for k, text in enumerate(outs):
            prefix = f"  -> ({k + 1}) " if len(outs) > 1 else "  -> "
            print(prefix + _short(text.strip(), limit), file=file)


def summarize(results: list[JobResult]) -> dict:
    """One report over several jobs (run one after another: memory is the peak over all)."""
    stats = [s for r in results for s in r.batch_stats]
    stocks = [r.stock for r in results if r.stock is not None]
    stock = None
    if stocks:
        eqs = [s["tokens_equal"] for s in stocks if s.get("tokens_equal") is not None]
        stock = {
            "wall_s": sum(s["wall_s"] for s in stocks),
            "new_tokens": sum(s["new_tokens"] for s in stocks),
            "kv_bytes": max(s["kv_bytes"] for s in stocks),
            "mismatches": sum(s["mismatches"] for s in stocks if s.get("tokens_equal") is not None),
            "tokens_equal": all(eqs) if eqs else None,
        }
        modes = {s.get("mode") for s in stocks}
        if len(modes) == 1 and None not in modes:
            stock["mode"] = modes.pop()
        elif len(modes) > 1:
            stock["mode"] = "per job: " + " / ".join(sorted(m or "same batches" for m in modes))
    return build_report(
        stats,
        prompts=sum(r.report["prompts"] for r in results),
        skipped=sum(r.skipped for r in results),
        sequences=sum(r.sequences for r in results),
        new_tokens=sum(r.new_tokens for r in results),
        wall_s=sum(r.wall_s for r in results),
        stock=stock,
        engine=merge_engine_figures([r.report["engine"] for r in results if r.report.get("engine")]),
    )


_SUMMED = ("steps", "decode_steps", "decode_rows", "decode_slots", "prompt_tokens", "new_tokens", "preemptions",
           "finished_requests")


def merge_engine_figures(figures: list[dict]) -> dict | None:
    """The engine figures of runs made one after another (jobs) or side by side (processes):
    counters add up; the peak blocks are the largest of one run (runs of one process never hold
    their pools at once; processes have one pool each, on their own device)."""
    if not figures:
        return None
    merged = {key: sum(f.get(key, 0) for f in figures) for key in _SUMMED}
    peak = max(figures, key=lambda f: f.get("peak_bytes", 0))
    for key in ("peak_blocks", "peak_bytes", "block_size", "block_bytes", "max_blocks"):
        merged[key] = peak.get(key, 0)
    dense = max(figures, key=lambda f: f.get("dense_bytes", 0))
    if dense.get("dense_bytes"):
        merged["dense_bytes"], merged["dense_batch_size"] = dense["dense_bytes"], dense.get("dense_batch_size")
    return merged
