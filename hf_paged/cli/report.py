"""The closing reports: speed, and KV memory (paged vs what stock's dense cache holds)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .jobs import JobResult


def build_report(batch_stats: list[dict], *, prompts: int, sequences: int, new_tokens: int, wall_s: float,
                 stock: dict | None = None, skipped: int = 0) -> dict:
    """The closing report of one job: ``prompts`` computed in this run, ``skipped`` ones already in
    the output file. Memory figures are peaks over batches (batches run one after another; each
    batch's cache is freed before the next)."""

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
    lines.append(
        f"   {report['prompts']} prompt(s), {report['sequences']} sequence(s), {report['batches']} batch(es): "
        f"{report['new_tokens']} new tokens in {report['wall_s']:.1f} s = {report['tokens_per_s']:.1f} tokens/s"
        + (f"; {report['skipped']} skipped (already in the output file)" if report.get("skipped") else "")
    )
    if not report["batches"]:  # every prompt was skipped: nothing ran, no memory to report
        return "\n".join(lines)
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
    stock = report.get("stock")
    if stock:
        eq = stock.get("tokens_equal")
        verdict = (
            "n/a (sampling)" if eq is None
            else "identical tokens" if eq
            else f"DIFFERENT tokens in {stock.get('mismatches')} of {report['sequences']} sequence(s)"
        )
        lines.append(
            f"   stock transformers (sdpa): {stock['wall_s']:.1f} s = {stock.get('tokens_per_s', 0):.1f} tokens/s, "
            f"KV cache measured {fmt_bytes(stock.get('kv_bytes', 0))}; paged vs stock: {verdict}"
        )
    return "\n".join(lines)


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
    return build_report(
        stats,
        prompts=sum(r.report["prompts"] for r in results),
        skipped=sum(r.skipped for r in results),
        sequences=sum(r.sequences for r in results),
        new_tokens=sum(r.new_tokens for r in results),
        wall_s=sum(r.wall_s for r in results),
        stock=stock,
    )
