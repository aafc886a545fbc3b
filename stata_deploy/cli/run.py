"""run: an exported file (or run folder) on any runtime in the RUNTIMES registry — a dataset or one image.

``--compare torch`` runs the torch reference on the same inputs: the run folder given by ``--run`` (default: the
folder the file lies in; its weights must be the ones the file was exported from, ``weights_sha256``) with the SAME
static masks the file carries (``runtime.masks``), and counts spike mismatches layer by
layer (binary/ternary layers exactly; real-valued layers such as A²OS²A's ReLU K within float tolerance).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np

from .main import FiniteFloat, emit, main, set_threads, threads_option
from ..errors import StataError

SUFFIX_RUNTIME = {".onnx": "onnxruntime", ".nir": "nir", ".h5": "lava", ".net": "lava"}


def infer_runtime(path: Path) -> str:
    if path.is_dir():
        return "torch"
    name = SUFFIX_RUNTIME.get(path.suffix.lower())
    if name is None:
        raise StataError(f"cannot tell the runtime from {path.name!r}: pass --runtime NAME")
    return name


def compare_spikes(got, ref) -> dict:
    """Spike mismatch counts between two RunResults over the layers both recorded."""
    common = [n for n in ref.spikes if n in got.spikes]
    out = {"spike_mismatches": 0, "spikes_compared": 0, "layers": {}, "layers_missing": sorted(set(ref.spikes) - set(got.spikes))}
    for n in common:
        a, b = np.asarray(got.spikes[n]), np.asarray(ref.spikes[n])
        if a.shape != b.shape:
            bad, size = int(b.size), int(b.size)
        elif np.isin(b, (-1.0, 0.0, 1.0)).all():
            bad, size = int((a != b).sum()), int(b.size)
        else:  # real-valued 'neuron' (ReLU): equal within float rounding, and the same zero pattern
            bad = int((~np.isclose(a, b, rtol=1e-5, atol=1e-6) | ((a == 0) != (b == 0))).sum())
            size = int(b.size)
        out["spike_mismatches"] += bad
        out["spikes_compared"] += size
        out["layers"][n] = bad
    return out


def _reference(rt, run: str | None):
    from ..description import check_run, find_run
    from ..registry import RUNTIMES

    run_dir = getattr(rt, "run_dir", None) or find_run(rt.path, run)
    ref = RUNTIMES.get("torch")(run_dir, masks=rt.masks)
    check_run(getattr(rt, "description", None) or {}, rt.path, run_dir, ref.meta.get("weights_sha256"))
    return ref


def _run_folder(rt, run: str | None) -> Path | None:
    """The run folder for defaults (its dataset): --run, the runtime's own (torch), or the file's folder."""
    cand = [Path(run)] if run else []
    cand += [Path(getattr(rt, "run_dir", None) or Path(rt.path).resolve().parent)]
    return next((c for c in cand if (c / "config.json").is_file()), None)


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {f"latency_ms_p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def _count_sops(rt, res):
    from ..energy.counter import count_ops

    return count_ops(rt.cfg, res, rt.masks)


@main.command("run")
@click.argument("file", type=click.Path())
@click.option("--runtime", "runtime_name", default=None, metavar="NAME",
              help="Runtime: torch | onnxruntime | nir | lava (default: from the file's suffix).")
@click.option("--dataset", default=None, help="Dataset to evaluate (default: the run's dataset, else digits).")
@click.option("--limit", default=None, type=click.IntRange(1, None), help="Only the first N test images.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 1 << 16))
@click.option("--image", default=None, type=click.Path(dir_okay=False), help="Run one input (.png/.jpg or .npy).")
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(1, 100000),
              help="--image: timed repetitions for the latency percentiles.")
@click.option("--compare", default=None, type=click.Choice(["torch"]), help="Also run the torch reference; count mismatches.")
@click.option("--run", "run_opt", default=None, type=click.Path(file_okay=False),
              help="--compare torch: the run folder FILE was exported from (default: the folder FILE lies in).")
@click.option("--precision", default=None, type=click.Choice(["float", "fixed"]), help="Runtime arithmetic (if it has a choice).")
@click.option("--timeout", default=None, type=FiniteFloat(0, 7 * 86400, lo_open=True),
              help="Runtime time limit, seconds (runtimes with a child process, e.g. lava).")
@click.option("--hardware", default=None,
              help="Price the operations this run computed on a hardware profile (45nm | loihi | spinnaker2 | "
                   "truenorth | FILE.toml/.json): per-layer table and energy per inference, as `stata-deploy energy`.")
@click.option("--baseline", default=None, type=click.Path(file_okay=False),
              help="With --hardware: an unpruned run counted (torch) on the same inputs: ops_ratio, energy_ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@threads_option
def run_cmd(file, runtime_name, dataset, limit, batch_size, image, repeat, compare, run_opt, precision, timeout,
            hardware, baseline, as_json, threads):
    """Run an exported model on a runtime: accuracy, SOPs, latency and throughput on a dataset, or the prediction
    for one image (the edge-inference path).

    \b
    Examples:
      stata-deploy run runs/a/model.onnx --runtime onnxruntime --dataset digits --json
      stata-deploy run runs/a/model.onnx --runtime onnxruntime --compare torch --limit 256
      stata-deploy run runs/a/model.onnx --image digit.png          # prediction, top-5, latency
    """
    from ..registry import RUNTIMES

    set_threads(threads)
    path = Path(file)
    if not path.exists():
        raise StataError(f"model file not found: {path}")
    name = runtime_name or infer_runtime(path)
    cls = RUNTIMES.get(name)
    given = {k: v for k, v in dict(precision=precision, timeout=timeout).items() if v is not None}
    refused = [k for k in given if k not in cls.accepts]
    if refused:  # an option the runtime would ignore is refused, not silently dropped
        have = ", ".join(f"--{a}" for a in cls.accepts if a != "threads") or "none"
        raise StataError(f"--{refused[0]} does not apply to the {name} runtime (its options: {have})")
    opts = dict(given)
    if baseline and not hardware:
        raise StataError("--baseline prices a comparison: it needs --hardware")
    profile = None
    if hardware:
        from ..energy.profiles import load_profile

        profile = load_profile(hardware)  # before any work
    if threads is not None and "threads" in cls.accepts:
        opts["threads"] = threads
    rt = cls(path, **opts)
    try:
        if image is not None:
            res = _run_image(rt, Path(image), repeat, compare, run_opt)
            if profile is not None:
                raise StataError("--hardware prices a dataset run; drop --image or --hardware")
        else:
            res = _run_dataset(rt, dataset, limit, batch_size, compare, run_opt, as_json, profile, baseline)
    finally:
        rt.close()
    res = {"runtime": name, "file": str(path), **res}
    emit(res, as_json, _human(res))


def _run_image(rt, image: Path, repeat: int, compare, run_opt) -> dict:
    from ..train.data import load_image

    cfg = rt.cfg
    x = load_image(image, frames=True)  # (C, H, W), or a .npy (T, C, H, W): one frame per timestep
    seq = x.ndim == 4
    if seq and x.shape[0] != cfg.T:
        raise StataError(f"input {image} has shape {tuple(x.shape)}: {x.shape[0]} frames (T, C, H, W), but the model "
                         f"runs T={cfg.T} timesteps (give {cfg.T} frames, or one (C, H, W) image to repeat)")
    frame = x[0] if seq else x
    want = (cfg.in_channels, cfg.img_size, cfg.img_size)
    if tuple(frame.shape) != want:
        raise StataError(f"image {image} has shape {tuple(frame.shape)} (channels, height, width); the model expects "
                         f"{want}" + (" — convert it first" if frame.shape[0] != want[0] else " — resize it first"))
    xb = x[:, None] if seq else x[None]  # (T, 1, C, H, W) frames or (1, C, H, W) repeated over T by the runtime
    res = rt.run(xb, record=True)  # also the warm-up
    times = [rt.run(xb, record=False).seconds for _ in range(repeat)]
    logits = res.logits[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:5]
    out = {"prediction": int(top[0]), "top5": [{"class": int(c), "prob": float(p[c])} for c in top],
           "accuracy": None, "sops": float(_count_sops(rt, res).sops), "samples": 1,
           "seconds": float(sum(times)), **_percentiles(times), "repeat": repeat}
    if compare:
        ref = _reference(rt, run_opt).run(xb)
        cmp = compare_spikes(res, ref)
        out.update(spike_mismatches=cmp["spike_mismatches"], spikes_compared=cmp["spikes_compared"],
                   prediction_agreement=float(ref.predictions[0] == out["prediction"]))
    return out


def _run_dataset(rt, dataset, limit, batch_size, compare, run_opt, as_json, profile=None, baseline=None) -> dict:
    from tqdm import tqdm

    from ..train.checkpoint import load_config
    from ..train.data import batches, load_dataset
    from .train import check_data_fits

    cfg = rt.cfg
    if dataset is None:
        run_dir = _run_folder(rt, run_opt)
        if run_dir is not None:
            dataset = load_config(run_dir)[1].get("train", {}).get("dataset")
        dataset = dataset or "digits"
    ds = load_dataset(dataset, T=cfg.T)
    check_data_fits(cfg, ds)
    x, y = ds.x_test[:limit], ds.y_test[:limit]
    ref = _reference(rt, run_opt) if compare else None
    first = next(batches(x, y, batch_size))[0].numpy()
    rt.run(first, record=False)  # warm-up (session initialisation, caches): not timed
    correct, n, times, agree, reports = 0, 0, [], 0, []
    cmp_tot = {"spike_mismatches": 0, "spikes_compared": 0, "layers": {}, "layers_missing": []}
    t_all = time.perf_counter()
    for xb, yb in tqdm(batches(x, y, batch_size), total=math.ceil(len(y) / batch_size), desc="run",
                       disable=as_json, leave=False):
        xb, yb = xb.numpy(), yb.numpy()
        res = rt.run(xb, record=True)
        times.append(res.seconds)
        pred = res.predictions
        correct += int((pred == yb).sum())
        n += len(yb)
        reports.append(_count_sops(rt, res))
        if ref is not None:
            r = ref.run(xb)
            agree += int((r.predictions == pred).sum())
            c = compare_spikes(res, r)
            cmp_tot["spike_mismatches"] += c["spike_mismatches"]
            cmp_tot["spikes_compared"] += c["spikes_compared"]
            cmp_tot["layers_missing"] = c["layers_missing"]
            for k, v in c["layers"].items():
                cmp_tot["layers"][k] = cmp_tot["layers"].get(k, 0) + v
    wall = time.perf_counter() - t_all
    run_seconds = float(sum(times))
    from ..energy.counter import OpsReport

    rep = OpsReport.merge(reports)
    out = {"accuracy": correct / n, "sops": rep.sops, "samples": n, "seconds": run_seconds,
           "wall_seconds": wall, "dataset": ds.name, "batch_size": batch_size, "latency_batches": len(times),
           **_percentiles(times), "throughput": n / run_seconds if run_seconds > 0 else None,
           "masks": (getattr(rt, "description", None) or {}).get("mask_source")
           or ("static" if rt.masks is not None else "none"), "timed_with_spike_outputs": True}
    if ref is not None:
        ref.close()
        out.update(spike_mismatches=cmp_tot["spike_mismatches"], spikes_compared=cmp_tot["spikes_compared"],
                   prediction_agreement=agree / n,
                   mismatch_layers={k: v for k, v in cmp_tot["layers"].items() if v},
                   layers_compared=len(cmp_tot["layers"]), layers_missing=cmp_tot["layers_missing"])
    if profile is not None:
        out.update(_price(rep, profile, rt, correct / n, x, y, baseline))
    return out


def _price(rep, profile, rt, acc, x, y, baseline) -> dict:
    """The energy fields of `stata-deploy energy` for the operations this runtime computed (same counter/profile)."""
    from ..energy.profiles import estimate_energy
    from .energy import _layers, _set_ratio, _summary, measure

    en = estimate_energy(rep, profile)
    res = {"hardware": profile.name, "citation": profile.citation, **_summary(rep, en, acc, rt.masks),
           "not_costed": en.not_costed, "layers": _layers(rep, en)}
    res["ops_counted_from"] = f"the {rt.name} runtime's spikes"
    if baseline:
        _, brep, bacc, bmasks = measure(baseline, x, y, "dynamic")
        ben = estimate_energy(brep, profile)
        res["baseline"] = {"run": str(baseline), **_summary(brep, ben, bacc, bmasks)}
        _set_ratio(res, "ops_ratio", rep.sops, brep.sops, "the baseline performs 0 operations")
        _set_ratio(res, "energy_ratio", en.total_mj, ben.total_mj, f"the baseline costs 0 mJ on {profile.name}")
    return res


def _human(r: dict) -> str:
    s = _human_run(r)
    if "energy_mj" in r:
        from .energy import table

        s += f"\n\noperations computed by {r['runtime']}, priced on {r['hardware']}:\n" + table(r["layers"], r)
        s += f"\nenergy per inference: {r['energy_mj']:.4e} mJ"
        if "baseline" in r:
            fr = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
            s += f"\nvs {r['baseline']['run']}: ops_ratio {fr(r['ops_ratio'])}  energy_ratio {fr(r['energy_ratio'])}"
    return s


def _human_run(r: dict) -> str:
    if "prediction" in r:
        top = ", ".join(f"{t['class']}:{t['prob']:.3f}" for t in r["top5"])
        s = f"prediction {r['prediction']}  top-5 [{top}]  latency p50 {r.get('latency_ms_p50', 0):.2f} ms"
    else:
        s = (f"accuracy {r['accuracy']:.4f} on {r['samples']} images ({r['runtime']}), {r['sops']:.4g} SOPs/sample, "
             f"latency p50 {r.get('latency_ms_p50', 0):.2f} ms/batch of {r['batch_size']}, "
             f"{r['throughput'] or 0:.1f} images/s")
    if "spike_mismatches" in r:
        s += (f"\nvs torch: {r['spike_mismatches']} spike mismatches of {r['spikes_compared']}, "
              f"prediction agreement {r['prediction_agreement']:.4f}")
    return s
