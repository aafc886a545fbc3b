"""Does STATA beat its baselines here? The scorer ablation of the paper's Table 1/5, resumable across sessions.

The study: Fashion-MNIST, ``spikformer-small`` (28x28 -> 49 image tokens, dim 32, depth 2, heads 4; the pruning site is
block 1, so block 1 computes on ceil(gamma * 49) of the 49 image tokens + the anchor, block 0 on all of them), every
scorer at every keep ratio gamma, the same seeds and the same data order for every scorer (the seed fixes the weights'
initialisation and the batch order), and TP-Spikformer training-free pruning of each trained unpruned checkpoint at
the same gammas:

    variant             training                                         the paper's row
    none                unpruned                                         (unpruned, 79.98)
    random              --prune random --keep G                          random 78.31
    l1                  --prune l1                                       l1-norm 78.51
    ssa                 --prune ssa                                      SSA-average 78.47
    anchor              --prune anchor (AT: the anchor row, the same tokens at every timestep)   AT 78.98
    stata               --prune stata (TAT: the anchor row per timestep)  TAT 79.23
    stata+intra         --prune stata --align intra                      +intra 79.58
    stata+intra+inter   --prune stata --align intra,inter                +inter 79.86
    stata-nograd        --prune stata --no-anchor-grad                   (not in the paper)
    stata+align-w10     --prune stata --align intra,inter --intra-weight 10 --inter-weight 10   (not in the paper)
    tp                  `stata-deploy prune none_s{seed} --method tp --keep G` (no training)

The anchor methods (anchor, stata*) train with ``--anchor-grad`` (the default): without it the anchor's spiking Q
never receives a gradient (top-k is not differentiable and the head reads image tokens only), stays silent, and
STATA's scores are all 0, so the activity tie-break alone decides (``benchmarks/anchor_diagnostics.py``);
``stata-nograd`` measures that. At the default alignment weights (1e-2) the weighted alignment gradients are
0.01-0.03 % of the classification loss's here (``benchmarks/alignment_diagnostics.py``): ``stata+align-w10`` trains
with weights 10, so that "+intra / +inter help" is also tested with losses that act. The recipe is all 60,000 training images x 3 epochs: the unpruned model reaches
86.3 % (seed 0; 30,000 images x 3 epochs gave 84.2 %, below the 85 % the study needs).

Resumable: a run stopped mid-way continues from its newest epoch checkpoint (bitwise the same result); every
finished run appends one record to the results file (default ``benchmarks/results/ablation.json``,
committed, so a study can span sessions); a rerun skips every (variant, gamma, seed) whose record has the same recipe.
Runs are trained in child processes (``--workers`` side by side, ``--threads`` each) into ``--out`` (gitignored).
The results file is JSON: ``{"format": "stata-deploy-ablation/1", "runs": [record, ...]}``, each record::

    {"variant": "stata+intra", "gamma": 0.5, "seed": 1, "recipe": {dataset, model, epochs, train_limit, batch_size,
     lr, warmup_epochs, prune, keep, align[, anchor_grad][, intra_weight, inter_weight]}, "recipe_id": sha256 of the recipe, "test_accuracy": 0.8712,
     "train_seconds": 812.3, "wall_seconds": 840.1, "commit": "<git HEAD>", "finished": "2026-12-01T22:10:00Z",
     "threads": 1}

Code version: the recipe fixes data, model and schedule, not the code; every record carries its commit. The committed
records were trained and evaluated at commit e5850f2 or earlier, where top-k broke ties between equal scores the way
``torch.topk`` does (the higher index); later commits give ties to the lower index (``scorers.top_indices``, ONNX's
rule), so a rerun there is not bitwise the same: evaluating the trained seed-0 runs under the new rule moved l1 /
stata / anchor by -0.05 / -0.03 / -0.01 pt. A study in progress stays on one commit (``git checkout e5850f2`` in the
study's own worktree); ``none`` has no selection and is unaffected.

Output: a table like the paper's (accuracy mean +- std over seeds per variant and gamma, and the paired difference
to random and to AT with a 95 % t-interval over seeds), a plot of accuracy vs gamma per scorer (``--plot``, PNG, not
committed), and the last line ``key=value``.

    python benchmarks/ablation.py --workers 2                    # the study (resumes; Ctrl-C safe)
    python benchmarks/ablation.py --table-only --plot ablation.png
    python benchmarks/ablation.py --dataset digits --model spikformer-tiny --epochs 1 --train-limit 128 \\
        --seeds 0,1 --gammas 0.5 --results /tmp/a.json --out /tmp/abl            # a smoke run in a minute
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FORMAT = "stata-deploy-ablation/1"
VARIANTS = {  # variant -> (prune method, alignment losses, anchor_grad: None = not an anchor method)
    "none": ("none", [], None),
    "random": ("random", [], None),
    "l1": ("l1", [], None),
    "ssa": ("ssa", [], None),
    "anchor": ("anchor", [], True),
    "stata": ("stata", [], True),
    "stata+intra": ("stata", ["intra"], True),
    "stata+intra+inter": ("stata", ["intra", "inter"], True),
    "stata-nograd": ("stata", [], False),  # the anchor without the straight-through path: its Q never learns
    "stata+align-w10": ("stata", ["intra", "inter"], True),  # alignment weights 10 (ALIGN_WEIGHTS): losses that act
    "tp": ("tp", [], None),  # training-free, from the unpruned run of the same seed
}
# variant -> alignment loss weights other than PruneConfig's 1e-2. At 1e-2 their weighted gradients are 0.008 % (intra)
# and 0.027 % (inter) of the classification loss's on this study's AT run (anchor_g0.5_s0; digits demo STATA run:
# 0.07 % / 0.21 %), benchmarks/alignment_diagnostics.py; at 10, ~8 % / ~27 %: they act without dominating.
ALIGN_WEIGHTS = {"stata+align-w10": {"intra_weight": 10.0, "inter_weight": 10.0}}
TRAINED = [v for v in VARIANTS if v != "tp"]


# ------------------------------------------------------------------------------------------------ results file
class Results:
    """The append-only results file (read, add a record, write atomically; one lock for the worker threads)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        d = json.loads(self.path.read_text())
        if d.get("format") != FORMAT:
            sys.exit(f"error: {self.path} is not a {FORMAT} results file")
        return d["runs"]

    def add(self, rec: dict) -> None:
        from stata_deploy.fileio import atomic_write_json

        with self.lock:
            runs = [r for r in self.load() if key(r) != key(rec)]
            atomic_write_json(self.path, {"format": FORMAT, "runs": runs + [rec]})


def key(r: dict) -> tuple:
    return r["variant"], r["gamma"], r["seed"], r["recipe_id"]


def recipe(a, variant: str, gamma: float | None) -> dict:
    method, align, anchor_grad = VARIANTS[variant]
    return {"dataset": a.dataset, "model": a.model, "epochs": a.epochs, "train_limit": a.train_limit,
            "batch_size": a.batch_size, "lr": a.lr, "warmup_epochs": a.warmup_epochs, "prune": method,
            "keep": 1.0 if gamma is None else gamma, "align": align,
            **({"anchor_grad": anchor_grad} if anchor_grad is not None else {}),
            **ALIGN_WEIGHTS.get(variant, {}),
            **({"tp_limit": a.tp_limit} if variant == "tp" else {})}


def recipe_id(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ one run
def run_dir(a, variant: str, gamma: float | None, seed: int) -> Path:
    g = "" if gamma is None else f"_g{gamma}"
    return Path(a.out) / f"{variant}{g}_s{seed}"


def child(a) -> None:
    """--child VARIANT GAMMA SEED: train one run (stata_deploy.train.loop.train, the API the CLI wraps)."""
    import torch

    from stata_deploy.train.loop import TrainConfig, train

    variant, gamma, seed = a.child[0], float(a.child[1]), int(a.child[2])
    method, align, anchor_grad = VARIANTS[variant]
    torch.set_num_threads(a.threads)
    out = run_dir(a, variant, None if method == "none" else gamma, seed)
    from stata_deploy.errors import StataError
    from stata_deploy.train.checkpoint import list_train_checkpoints

    def config(resume: bool):
        return TrainConfig(dataset=a.dataset, model=a.model, out=str(out), epochs=a.epochs, batch_size=a.batch_size,
                           lr=a.lr, warmup_epochs=a.warmup_epochs, seed=seed, prune=method,
                           keep=1.0 if method == "none" else gamma, align=align, anchor_grad=anchor_grad,
                           **ALIGN_WEIGHTS.get(variant, {}),
                           train_limit=a.train_limit or None, progress=False, resume=resume, force=not resume)

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    # an unfinished run of this recipe (a study stopped mid-run) continues from its newest epoch checkpoint
    # (bitwise the same result as uninterrupted); anything else in the study's own folder is redone
    if out.is_dir() and list_train_checkpoints(out):
        try:
            print(json.dumps(train(config(True), log=log)))
            return
        except StataError as e:
            log(f"[resume refused: {e}; training from scratch]")
    print(json.dumps(train(config(False), log=log)))


def _child_cmd(a, variant, gamma, seed) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", variant, str(gamma or 1.0), str(seed),
            "--dataset", a.dataset, "--model", a.model, "--epochs", str(a.epochs), "--warmup-epochs",
            str(a.warmup_epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--threads", str(a.threads),
            "--train-limit", str(a.train_limit or 0), "--out", str(a.out)]


def train_one(a, res: Results, variant: str, gamma: float | None, seed: int, log) -> None:
    rec = recipe(a, variant, gamma)
    rid = recipe_id(rec)
    if any(key(r) == (variant, gamma, seed, rid) for r in res.load()):
        log(f"[skip] {variant} gamma={gamma} seed={seed}: in {res.path}")
        return
    d = run_dir(a, variant, gamma, seed)
    d.parent.mkdir(parents=True, exist_ok=True)
    cmd = _child_cmd(a, variant, gamma, seed)
    log(f"[start] {d.name}")
    t0 = time.time()
    with open(d.parent / f"{d.name}.log", "w") as lf:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True, cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if p.returncode != 0:
        log(f"[fail] {d.name}: exit {p.returncode}; see {d.parent / (d.name + '.log')}")
        return
    m = json.loads(p.stdout.strip().splitlines()[-1])
    res.add({"variant": variant, "gamma": gamma, "seed": seed, "recipe": rec, "recipe_id": rid,
             "test_accuracy": m["test_accuracy"], "train_seconds": m["train_seconds"],
             "wall_seconds": time.time() - t0, "commit": commit(), "threads": a.threads,
             "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    log(f"[done] {d.name}: accuracy {m['test_accuracy']:.4f}, {m['train_seconds']:.0f} s")


def tp_one(a, res: Results, gamma: float, seed: int, log) -> None:
    rec = recipe(a, "tp", gamma)
    rid = recipe_id(rec)
    if any(key(r) == ("tp", gamma, seed, rid) for r in res.load()):
        return
    base = run_dir(a, "none", None, seed)
    if not (base / "metrics.json").is_file():
        log(f"[wait] tp gamma={gamma} seed={seed}: the unpruned run {base} is not trained (here) yet")
        return
    out = run_dir(a, "tp", gamma, seed)
    cmd = [sys.executable, "-m", "stata_deploy", "prune", str(base), "--method", "tp", "--keep", str(gamma),
           "--out", str(out), "--force", "--json", "--threads", str(a.threads)]
    if a.tp_limit:
        cmd += ["--limit", str(a.tp_limit)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if p.returncode != 0:
        log(f"[fail] tp gamma={gamma} seed={seed}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return
    m = json.loads(p.stdout.strip().splitlines()[-1])
    res.add({"variant": "tp", "gamma": gamma, "seed": seed, "recipe": rec, "recipe_id": rid,
             "test_accuracy": m["test_accuracy"], "train_seconds": 0.0, "wall_seconds": time.time() - t0,
             "token_ratio": m["token_ratio"], "commit": commit(), "threads": a.threads,
             "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    log(f"[tp] gamma={gamma} seed={seed}: accuracy {m['test_accuracy']:.4f}")


# ------------------------------------------------------------------------------------------------ the table
def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired(a_by_seed: dict, b_by_seed: dict) -> tuple[float, float, int] | None:
    """(mean difference a - b in points, 95 % half-width over seeds, n) on the seeds both have."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    if len(seeds) < 2:
        return None
    d = [100 * (a_by_seed[s] - b_by_seed[s]) for s in seeds]
    return statistics.mean(d), _t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)), len(d)


def cells(a, runs: list[dict]) -> dict:
    """(variant, gamma) -> {seed: accuracy} for the records of this recipe."""
    out: dict = {}
    for r in runs:
        g = None if r["variant"] == "none" else r["gamma"]
        if r["recipe_id"] != recipe_id(recipe(a, r["variant"], g)):
            continue  # another recipe (other epochs, data, ...): not mixed into this table
        out.setdefault((r["variant"], g), {})[r["seed"]] = r["test_accuracy"]
    return out


# the seed paper's Table 1/5 (CIFAR-100, spikformer-4-384, gamma 0.5): the column beside ours in --markdown
PAPER = {"none": 79.98, "random": 78.31, "l1": 78.51, "ssa": 78.47, "anchor": 78.98, "stata": 79.23,
         "stata+intra": 79.58, "stata+intra+inter": 79.86}


def table_rows(a, runs: list[dict]) -> tuple[list[tuple], dict]:
    """[(variant, gamma or None, n, accuracy 'm ± s', vs random, vs AT)] and the key=value summary."""
    c = cells(a, runs)
    base = c.get(("none", None), {})
    rows, kv = [], {}
    if base:
        v = [100 * x for x in base.values()]
        rows.append(("none", None, len(v), _ms(v), "", ""))
        kv["acc_none"] = round(statistics.mean(v), 2)
    for g in a.gamma_list:
        for var in [v for v in VARIANTS if v != "none"]:
            s = c.get((var, g))
            if not s:
                continue
            v = [100 * x for x in s.values()]
            vs = [_pd(paired(s, c.get((ref, g), {}))) if var != ref else "" for ref in ("random", "anchor")]
            rows.append((var, g, len(v), _ms(v), *vs))
            kv[f"acc_{var}_g{g}"] = round(statistics.mean(v), 2)
    return rows, kv


def table(a, runs: list[dict], markdown: bool = False) -> tuple[str, dict]:
    rows, kv = table_rows(a, runs)
    if markdown:
        lines = ["| variant | gamma | n | accuracy % | vs random (pt) | vs AT (pt) | paper (CIFAR-100, gamma 0.5) |",
                 "|---|---|---|---|---|---|---|"]
        for var, g, n, acc, r, at in rows:
            paper = PAPER.get(var, "") if g in (None, 0.5) else ""
            lines.append(f"| {_label(var)} | {'-' if g is None else g} | {n} | "
                         f"{acc} | {r} | {at} | {paper} |")
        return "\n".join(lines), kv
    lines = [f"{a.dataset}, {a.model}, {a.epochs} epochs, train images {a.train_limit or 'all'}; accuracy % "
             "(mean ± std over seeds), paired difference in points with a 95 % t-interval over seeds",
             f"{'variant':<19}{'gamma':>6}{'n':>3}  {'accuracy %':>14}  {'vs random':>15}  {'vs AT (anchor)':>15}"]
    for var, g, n, acc, r, at in rows:
        lines.append(f"{_label(var):<19}{'-' if g is None else g:>6}{n:>3}  {acc:>14}  {r:>15}  {at:>15}".rstrip())
    return "\n".join(lines), kv


def _label(var: str) -> str:
    return "none (unpruned)" if var == "none" else var


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def _pd(p) -> str:
    return "-" if p is None else f"{p[0]:+.2f} ± {p[1]:.2f}"


def verdicts(a, runs: list[dict]) -> list[str]:
    """A plain statement per paper claim: supported, contradicted, or cannot tell (95 % intervals over seeds)."""
    c = cells(a, runs)
    out = []

    def say(claim, p):
        if p is None:
            out.append(f"{claim}: cannot tell (fewer than 2 paired seeds)")
        elif p[0] - p[1] > 0:
            out.append(f"{claim}: supported ({p[0]:+.2f} ± {p[1]:.2f} pt, n={p[2]})")
        elif p[0] + p[1] < 0:
            out.append(f"{claim}: contradicted ({p[0]:+.2f} ± {p[1]:.2f} pt, n={p[2]})")
        else:
            out.append(f"{claim}: cannot tell ({p[0]:+.2f} ± {p[1]:.2f} pt, n={p[2]}: the interval contains 0)")

    for g in a.gamma_list:
        get = lambda v: c.get((v, g), {})  # noqa: E731
        say(f"gamma {g}: TAT (stata) > AT (anchor)", paired(get("stata"), get("anchor")))
        say(f"gamma {g}: AT (anchor) > random", paired(get("anchor"), get("random")))
        say(f"gamma {g}: TAT (stata) > random", paired(get("stata"), get("random")))
        say(f"gamma {g}: +intra helps", paired(get("stata+intra"), get("stata")))
        say(f"gamma {g}: +inter helps", paired(get("stata+intra+inter"), get("stata+intra")))
        say(f"gamma {g}: training the anchor (--anchor-grad) helps", paired(get("stata"), get("stata-nograd")))
        say(f"gamma {g}: alignment at weight 10 (not 1e-2) helps", paired(get("stata+align-w10"), get("stata")))
        p = paired(get("stata+intra+inter"), c.get(("none", None), {}))
        if p is None:
            out.append(f"gamma {g}: STATA within 1 pt of unpruned: cannot tell (fewer than 2 paired seeds)")
        else:
            lo = p[0] - p[1]
            verdict = "supported" if lo > -1 else ("contradicted" if p[0] + p[1] < -1 else "cannot tell")
            out.append(f"gamma {g}: STATA (+intra+inter) within 1 pt of unpruned: {verdict} ({p[0]:+.2f} ± {p[1]:.2f} pt)")
    return out


def plot(a, runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stata_deploy.fileio import write_via_buffer

    c = cells(a, runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = [v for v in VARIANTS if v != "none" and any(c.get((v, g)) for g in a.gamma_list)]
    step = 0.04 / max(len(shown), 1)  # side by side at each gamma, so the error bars do not hide each other
    for i, var in enumerate(shown):
        gs = sorted(g for g in a.gamma_list if c.get((var, g)))
        m = [100 * statistics.mean(c[(var, g)].values()) for g in gs]
        s = [100 * statistics.stdev(c[(var, g)].values()) if len(c[(var, g)]) > 1 else 0 for g in gs]
        x = [g + (i - (len(shown) - 1) / 2) * step for g in gs]
        ns = sorted({len(c[(var, g)]) for g in gs})
        n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        ax.errorbar(x, m, yerr=s, marker="os^vD<>ph*"[i % 10], capsize=3, label=f"{var} (n={n})")
    if c.get(("none", None)):
        none = [100 * v for v in c[("none", None)].values()]
        mu = statistics.mean(none)
        sd = statistics.stdev(none) if len(none) > 1 else 0.0
        ax.axhline(mu, color="k", ls="--", lw=1, label=f"unpruned (n={len(none)}, band: ± std)")
        ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.08)
    ax.set_xticks(sorted(a.gamma_list))
    ax.set_xlabel("keep ratio gamma (points side by side at each gamma)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{a.dataset}, {a.model}: scorer ablation\nmean ± std over seeds")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_via_buffer(Path(path), lambda buf: fig.savefig(buf, dpi=130, format="png"))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="spikformer-small")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--gammas", default="0.5,0.3", help="in the order they are run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all 60,000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--workers", type=int, default=2, help="training processes side by side")
    ap.add_argument("--tp-limit", type=int, default=None, help="TP: evaluate on the first N test images only")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ablation.json"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "ablation"), help="run folders (gitignored)")
    ap.add_argument("--plot", default=None, help="accuracy vs gamma per scorer (PNG)")
    ap.add_argument("--table-only", action="store_true", help="train nothing; print the table of recorded runs")
    ap.add_argument("--markdown", action="store_true", help="the table as Markdown (the README's), paper column")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "GAMMA", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.train_limit = a.train_limit or None
    if a.child:
        child(a)
        return 0
    a.gamma_list = [float(g) for g in a.gammas.split(",") if g.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    res = Results(Path(a.results))

    def log(s):
        print(f"{time.strftime('%H:%M:%S')} {s}", flush=True)

    t0 = time.time()
    if not a.table_only:
        from stata_deploy.train.data import load_dataset
        from stata_deploy.errors import StataError

        try:  # one clear line before 45 children fail one after another on the same missing dataset
            load_dataset(a.dataset, T=4)
        except StataError as e:
            sys.exit(f"error: {e}")
        # gamma-major: the unpruned runs of every seed, then every scorer x seed at the first gamma (and TP at it),
        # then the next gamma -- so a study cut short answers the first gamma's claims with n = len(seeds)
        blocks = [[("none", None, s) for s in seeds if "none" in variants]]
        blocks += [[(v, g, s) for s in seeds for v in variants if v in TRAINED and v != "none"] for g in a.gamma_list]
        with ThreadPoolExecutor(max_workers=a.workers) as pool:
            for i, jobs in enumerate(blocks):
                list(pool.map(lambda j: train_one(a, res, *j, log), jobs))
                if i and "tp" in variants:
                    for s in seeds:
                        tp_one(a, res, a.gamma_list[i - 1], s, log)
    runs = res.load()
    text, kv = table(a, runs, a.markdown)
    print("\n" + text + "\n")
    for v in verdicts(a, runs):
        print(v)
    mine = [r for r in runs if r["recipe_id"] in {recipe_id(recipe(a, v, None if v == "none" else g))
                                                  for v in VARIANTS for g in a.gamma_list}]
    total = sum(r["wall_seconds"] for r in mine)
    print(f"\n{len(mine)} runs recorded in {res.path}; their wall time {total / 3600:.2f} h "
          f"({total / max(1, len(mine)) / 60:.1f} min per run); this invocation {time.time() - t0:.0f} s")
    if a.plot:
        plot(a, runs, a.plot)
        print(f"plot written to {a.plot}")
    print(" ".join(f"{k}={v}" for k, v in {"runs": len(mine), **kv}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
