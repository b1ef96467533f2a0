"""``report.md`` and PNG plots of a run's ``results.json``."""

from __future__ import annotations

from pathlib import Path


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.2f}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(summary: dict, out_dir: Path) -> None:
    doms = summary["domains"]
    # a run from model.init_from: the checkpoint as it started, above the stages' rows
    initial = summary.get("initial_ppl")
    initial = [["before stage 0 (model.init_from)"] + initial] if initial else []
    parts = [
        "# Lifelong pre-training report",
        "",
        "## Perplexity matrix (row: after stage i; column: validation domain)",
        "",
        markdown_table(
            ["after stage"] + doms,
            initial + [
                [f"{i} ({s['domain']})"] + row
                for i, (s, row) in enumerate(zip(summary["stages"], summary["ppl_matrix"]))
            ],
        ),
        "",
        "## Lifelong metrics",
        "",
        "AP: geometric mean PPL over the domains seen so far (arithmetic mean beside it). "
        "AP+: mean increase of earlier domains' PPL since they were learned (forgetting).",
        "",
        markdown_table(
            ["stage", "domain", "AP (geo)", "AP (arith)", "AP+"],
            [
                [i, s["domain"], summary["AP"][i], summary["AP_arithmetic"][i], summary["AP_plus"][i]]
                for i, s in enumerate(summary["stages"])
            ],
        ),
        "",
        "## Cost",
        "",
        markdown_table(
            [
                "stage",
                "domain",
                "steps",
                "tokens",
                "train FLOPs",
                "cum. FLOPs (+teacher)",
                "wall s",
                "data wait s",
                "restarts",
                "bad records",
            ],
            [
                [
                    i,
                    s["domain"],
                    s["steps"],
                    s["tokens"],
                    s["train_flops"],
                    s["cumulative_flops"],
                    s["wall_time_s"],
                    s["data_wait_s"],
                    s["restarts"],
                    s["bad_records"].get("count", 0),
                ]
                for i, s in enumerate(summary["stages"])
            ],
        ),
    ]
    grown = [(i, s) for i, s in enumerate(summary["stages"]) if s.get("growth")]
    if grown:
        parts += [
            "",
            "## Growth events",
            "",
            markdown_table(
                [
                    "stage",
                    "domain",
                    "before (L/d/heads/ffn)",
                    "after",
                    "params",
                    "max logit error",
                    "optimizer",
                    "seconds",
                ],
                [
                    [
                        i,
                        s["domain"],
                        _sizes(s["growth"]["before"]),
                        _sizes(s["growth"]["after"]),
                        f"{s['growth']['params_before']:,} -> {s['growth']['params_after']:,}",
                        f"{s['growth']['max_logit_error']:.2e}",
                        s["growth"]["optimizer"],
                        s["growth"]["expand_seconds"],
                    ]
                    for i, s in grown
                ],
            ),
        ]
    bad = [e for s in summary["stages"] for e in s["bad_records"].get("examples", [])]
    if bad:
        parts += ["", "## Skipped bad records (first examples)", ""] + [f"- {e}" for e in bad[:10]]
    plots = write_plots(summary, out_dir)
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "report.md").write_text("\n".join(parts) + "\n")


def _sizes(d: dict) -> str:
    return f"{d['num_hidden_layers']}/{d['hidden_size']}/{d['num_attention_heads']}/{d['intermediate_size']}"


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    """PPL-matrix heat map and per-stage loss curves; skipped if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib not installed (pip install 'ray_lifelong[plots]'): no PNG plots")
        return []
    import numpy as np

    doms = summary["domains"]
    m = np.log(np.asarray(summary["ppl_matrix"], dtype=float))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = ax1.imshow(m, cmap="viridis")
    ax1.set_xticks(range(len(doms)), doms, rotation=45)
    ax1.set_yticks(range(len(m)), [f"after {s['domain']}" for s in summary["stages"]])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax1.text(
                j, i, f"{summary['ppl_matrix'][i][j]:.0f}", ha="center", va="center", color="w", fontsize=8
            )
    ax1.set_title("validation perplexity (colour: log PPL)")
    fig.colorbar(im, ax=ax1)
    offset = 0
    for s in summary["stages"]:
        h = s["history"]
        if h:
            ax2.plot([offset + r["step"] for r in h], [r["loss"] for r in h], label=s["domain"])
            offset += s["steps"]
    ax2.set_xlabel("optimizer step (cumulative over stages)")
    ax2.set_ylabel("training loss")
    ax2.set_title("loss curves")
    ax2.legend()
    fig.tight_layout()
    path = out_dir / "ppl_matrix_and_loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
