"""End-to-end benchmark of the streaming engine (not a test).

Builds synthetic bf16 checkpoints of a Llama-shaped model (hidden 2048, MLP 5632, vocab 32000, untied head; the
number of layers sets the size), then merges them in a child process per run and reports:
  wall time of the merge, peak anonymous memory (RssAnon, polled every 5 ms in the child: the page cache of the
  mmapped inputs is not counted) above the child's baseline after imports, bytes read from storage
  (/proc/self/io read_bytes; inputs are evicted from the page cache before every run with
  posix_fadvise(DONTNEED), so reads are cold), and the engine's own estimate (--dry-run figure) for comparison.
For weight averaging it also measures, in the same child, the time to just read every input file and write an
output of the same size (both cold, the write fsynced like the engine's), and reports merge time / that.

    python bench/bench_engine.py --T 2 4 8 --size-gb 1 --methods cart
    python bench/bench_engine.py --T 4 --size-gb 0.5 1 2 --methods cart weight_average
    python bench/bench_engine.py --T 4 --size-gb 0.5 --methods cart tsv iso_c iso_cts

A method that declares needs_base (TSV-M, Iso-C, Iso-CTS, task arithmetic, TIES, ...) also gets a base checkpoint
of the same shapes (one more random draw), built once per size when any such method is asked for.

Checkpoints go to a temporary directory (under --tmp, default /tmp) that is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def llama_shapes(layers: int):
    h, f = HIDDEN, INTER
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (VOCAB, h)
    return shapes


def layers_for(size_gb: float) -> int:
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    per = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    return max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per))  # at least size_gb


def model_bytes(layers: int) -> int:
    n = 0
    for s in llama_shapes(layers).values():
        k = 1
        for d in s:
            k *= d
        n += k
    return 2 * n


def make_checkpoint(path: Path, layers: int, seed: int) -> None:
    """One bf16 checkpoint, written tensor by tensor with the engine's own streaming writer (low memory)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from centered_merge.io.base import TensorInfo
    from centered_merge.io.writer import ShardedWriter

    shapes = llama_shapes(layers)
    items = [(k, TensorInfo(s, torch.bfloat16)) for k, s in shapes.items()]
    w = ShardedWriter(path, items, shard_size=10**12, queue_depth=1)
    g = torch.Generator().manual_seed(seed)
    for k in w.order:
        t = torch.randn(shapes[k], generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        w.write(k, t)
        del t
    w.commit()


def evict(paths):
    """Drop these files' pages from the page cache (only ours: posix_fadvise on each file)."""
    for p in paths:
        for f in (Path(p).rglob("*") if Path(p).is_dir() else [Path(p)]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


# --- child: one measured merge ---------------------------------------------------------------------------------
def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def child(args) -> None:
    import threading

    import torch

    sys.path.insert(0, str(ROOT))
    from centered_merge.engine import merge_checkpoints, plan_merge

    spec = json.loads(args.child)
    res = {}
    models, out = spec["models"], Path(spec["out"])
    params = spec.get("params", {})
    base_model = spec.get("base")
    plan = plan_merge(models, spec["method"], base_model, read_ahead=spec["read_ahead"], **params)
    res["estimate_host_bytes"] = plan["peak_memory_estimate"]["host_bytes"]
    res["largest_tensor_bytes"] = plan["largest_tensor_bytes"]
    res["gflop"] = plan["total_flops"] / 1e9
    if spec.get("io_baseline"):
        evict(models)
        buf = bytearray(64 << 20)
        t0 = time.perf_counter()
        for m in models:
            for f in sorted(Path(m).rglob("*.safetensors")):
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
        nbytes = plan["bytes_out"]
        with open(out.parent / "io_baseline.bin", "wb", buffering=0) as fh:
            left = nbytes
            mv = memoryview(buf)
            while left > 0:
                left -= fh.write(mv[:min(left, len(buf))])
            os.fsync(fh.fileno())
        res["io_seconds"] = time.perf_counter() - t0
        os.unlink(out.parent / "io_baseline.bin")
        del buf
    evict(models + ([base_model] if base_model else []))
    base = _status()
    peak = dict(base)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            s = _status()
            for k in ("RssAnon", "RssFile"):
                peak[k] = max(peak[k], s[k])
            time.sleep(0.005)

    th = threading.Thread(target=poll, daemon=True)
    io0 = _io()
    th.start()
    t0 = time.perf_counter()
    rep = merge_checkpoints(models, out, method=spec["method"], base=base_model, progress=False,
                            read_ahead=spec["read_ahead"], **params)
    res["seconds"] = time.perf_counter() - t0
    stop.set()
    th.join()
    io1 = _io()
    res.update(baseline_anon=base["RssAnon"], peak_anon=peak["RssAnon"], peak_file=peak["RssFile"],
               read_bytes=io1["read_bytes"] - io0["read_bytes"], write_bytes=io1["write_bytes"] - io0["write_bytes"],
               engine_bytes_read=rep.bytes_read, bytes_written=rep.bytes_written, threads=torch.get_num_threads(),
               timings=rep.timings)
    try:
        import centered_merge

        res["backend"] = (centered_merge.build_info().get("backend") or {}).get("cpu", "?")
    except Exception:  # noqa: BLE001
        res["backend"] = "?"

    print("RESULT " + json.dumps(res))


# --- parent ----------------------------------------------------------------------------------------------------
def gb(n):
    return f"{n / 1e9:.2f}"


def mb(n):
    return f"{n / 2**20:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[4])
    ap.add_argument("--size-gb", type=float, nargs="+", default=[1.0])
    ap.add_argument("--methods", nargs="+", default=["cart", "weight_average"])
    ap.add_argument("--rank", type=float, default=0.12)
    ap.add_argument("--read-ahead", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    from centered_merge.methods.registry import method_class

    with_base = [m for m in args.methods if method_class(m).needs_base]

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)  # so the temporary checkpoints are deleted on kill
    root = Path(tempfile.mkdtemp(prefix="cm_bench_", dir=args.tmp))
    rows = []
    try:
        for size in args.size_gb:
            layers = layers_for(size)
            mdir = root / f"size{size}"
            mdir.mkdir()
            paths = []
            t0 = time.perf_counter()
            for i in range(max(args.T)):
                p = mdir / f"ft{i}"
                make_checkpoint(p, layers, seed=1000 + i)
                paths.append(str(p))
            base_path = None
            if with_base:
                base_path = str(mdir / "base")
                make_checkpoint(Path(base_path), layers, seed=999)
            os.sync()
            print(f"# built {max(args.T) + bool(base_path)} checkpoints of {gb(model_bytes(layers))} GB "
                  f"({layers} layers) "
                  f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for T in args.T:
                for method in args.methods:
                    out = root / "out"
                    params = {"rank": args.rank} if method == "cart" else {}
                    spec = {"models": paths[:T], "out": str(out), "method": method, "params": params,
                            "base": base_path if method in with_base else None,
                            "read_ahead": args.read_ahead, "io_baseline": method == "weight_average"}
                    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                       text=True)
                    shutil.rmtree(out, ignore_errors=True)
                    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                    if r.returncode or not line:
                        print(r.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"run failed: T={T} size={size} method={method}")
                    res = json.loads(line[0][7:])
                    res.update(T=T, size=model_bytes(layers), method=method, layers=layers)
                    rows.append(res)
                    print(f"# {method} T={T} {gb(res['size'])} GB: {res['seconds']:.1f} s, "
                          f"peak anon +{mb(res['peak_anon'] - res['baseline_anon'])} MiB", file=sys.stderr,
                          flush=True)
            shutil.rmtree(mdir)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("\n| method | T | model GB | layers | wall s | peak RssAnon above baseline MiB | estimate MiB | "
          "largest tensor MiB | peak ÷ largest tensor | read from disk GB | written GB | GFLOP | "
          "merge ÷ (read+write) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['seconds'] / r['io_seconds']:.2f} ({r['io_seconds']:.1f} s)" if "io_seconds" in r else "-"
        peak = r['peak_anon'] - r['baseline_anon']
        print(f"| {r['method']} | {r['T']} | {gb(r['size'])} | {r['layers']} | {r['seconds']:.1f} | "
              f"{mb(peak)} | {mb(r['estimate_host_bytes'])} | "
              f"{mb(r['largest_tensor_bytes'])} | {peak / r['largest_tensor_bytes']:.1f} | "
              f"{gb(r['read_bytes'])} | {gb(r['bytes_written'])} | "
              f"{r['gflop']:.0f} | {ratio} |")
    print(f"\nbaseline RssAnon after imports: {mb(rows[0]['baseline_anon'])} MiB; torch threads: {rows[0]['threads']}; "
          f"element-wise ops: {rows[0].get('backend')}")
    print("main thread, seconds waiting for reads / merging / waiting for writes / finishing:")
    for r in rows:
        t = r.get("timings", {})
        print(f"  {r['method']} T={r['T']} {gb(r['size'])} GB: " + " / ".join(f"{t.get(k, 0):.1f}" for k in
                                                                          ("read", "compute", "write", "finish")))


if __name__ == "__main__":
    main()
