"""Benchmark: how busy the generating stages keep an endpoint (slot utilisation), at scale.

Starts the simulated vLLM-like endpoint (tests/simulated_endpoint.py) as a process of its own on loopback,
`--slots` requests served at once, each held for `--ttft-s` + completion tokens / `--tokens-per-s`, and
runs seeds -> self_instruct -> evol_instruct (`--rounds` rounds, every row evolved) through the pipeline's
own stage functions and openai backend (`configs/openai.yaml`, chat mode, `max_concurrency` = slots).
Between stages the server's meter is reset, so each stage's figures are its own:

- `seconds`: wall time of the stage; `ideal_s`: busy slot-seconds / slots, the time a client that kept
  every slot busy from the first request to the last would take; `measured_over_ideal` = seconds / ideal_s.
- `utilisation`: busy slot-seconds / (slots x the server's span from first arrival to last answer).
- `requests`, `completion_tokens` as the server counted them; `client_cpu_s` (this process's user + system
  CPU over the stage) and its share of the wall time; `peak_rss_mb` of this process at the end of the stage.
- `phases`: per kind of request (instruction lists, classification, instances, rewrites, equality,
  responses), the window from its first arrival to its last answer and the slots' utilisation over that
  window by every request (the instance phase of self_instruct is `instances_*`).

Two references. The work itself: busy slot-seconds are what the endpoint must spend whatever the client
does, so `ideal_s` is the best any client can do. And the peer: distilabel's EvolInstruct (1.5.3, from PyPI,
in a venv of its own that this script makes under ~/.cache/instructflow/bench-venvs) evolves the first
`--peer-rows` rows of the same evol input on the same endpoint, `--rounds` evolutions and an answer to each,
in batches of `--peer-batch` rows (default: the slots, so both clients hold at most that many requests in
flight), beside our evol_instruct stage on the same rows (`peer` in the JSON; `--peer-rows 0` skips it).
The work differs: ours also asks, per evolution, whether the rewrite equals its input (WizardLM's
elimination step) and answers only the evolutions that pass. So compare utilisation and measured/ideal,
not seconds.

    python benchmarks/endpoint_scale.py --tasks 20000            # the issue's scale
    python benchmarks/endpoint_scale.py --tasks 2000 --slots 256 # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _get(url: str, method: str = "GET") -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _server_figures(server: str, seconds: float, cpu_s: float) -> dict:
    """What the server's meter says about the work since its last reset, beside the client's time and CPU."""
    meter = _get(f"{server}/stats")
    return {"seconds": round(seconds, 2), "ideal_s": meter["ideal_s"],
            "measured_over_ideal": round(seconds / meter["ideal_s"], 3) if meter["ideal_s"] else None,
            "utilisation": meter["utilisation"], "mean_in_service": meter["mean_in_service"],
            "requests": meter["requests"], "rejected": meter["rejected"],
            "completion_tokens": meter["completion_tokens"], "requests_by_kind": meter["by_kind"],
            "client_cpu_s": round(cpu_s, 2), "client_cpu_share": round(cpu_s / seconds, 3)}


def _measure(name: str, server: str, work) -> tuple[object, dict]:
    _get(f"{server}/stats/reset", "POST")
    cpu0, t0 = _cpu_s(), time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    figures = _server_figures(server, seconds, _cpu_s() - cpu0)
    return result, {"stage": name, **figures, "phases": _get(f"{server}/stats/phases"),
                    "peak_rss_mb": _peak_rss_mb()}


# distilabel 1.5.3 imports `requests` without declaring it.
PEER = ("distilabel[openai]==1.5.3", "requests")


def _peer_python() -> Path:
    """The python of a venv holding distilabel (made once; its pins may clash with ours)."""
    venv = Path.home() / ".cache" / "instructflow" / "bench-venvs" / "distilabel-1.5.3"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER], check=True)
        (venv / ".ready").write_text(" ".join(PEER) + "\n")
    return python


def _peer(server: str, instructions: list[str], args, evol_cfg) -> dict:
    """distilabel's EvolInstruct on `instructions`, measured as our stages are (benchmarks/peer_distilabel_evol.py)."""
    import tempfile

    python = _peer_python()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(instructions, f)
        f.flush()
        _get(f"{server}/stats/reset", "POST")
        done = subprocess.run([str(python), str(ROOT / "benchmarks" / "peer_distilabel_evol.py"), "--rows", f.name,
                               "--base-url", f"{server}/v1", "--rounds", str(args.rounds),
                               "--batch", str(args.peer_batch or args.slots),
                               "--max-new-tokens", str(evol_cfg.response_max_new_tokens),
                               "--temperature", str(evol_cfg.temperature)],
                              stdout=subprocess.PIPE, text=True, check=True)  # its log passes through
    figures = json.loads(done.stdout.strip().splitlines()[-1])  # its own seconds and CPU
    return {**figures, **_server_figures(server, figures["seconds"], figures["client_cpu_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000, help="new Self-Instruct tasks to make")
    parser.add_argument("--rounds", type=int, default=2, help="evolution rounds")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--ttft-s", type=float, default=0.2)
    parser.add_argument("--tokens-per-s", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--peer-rows", type=int, default=2000, help="rows for the distilabel arm (0: none)")
    parser.add_argument("--peer-batch", type=int, default=0, help="distilabel's input_batch_size (0: slots)")
    args = parser.parse_args()

    from tasks.config import load_config
    from tasks.evol_instruct import evolve
    from tasks.llm.openai_backend import OpenAILLM
    from tasks.seeds import load_seeds
    from tasks.self_instruct import generate_tasks, seed_examples
    from tests.servers import free_port, wait_for_http

    port = args.port or free_port()
    log = Path("/tmp") / f"simulated-endpoint-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "tests.simulated_endpoint", "--port", str(port),
                                   "--slots", str(args.slots), "--ttft-s", str(args.ttft_s),
                                   "--tokens-per-s", str(args.tokens_per_s)], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/v1/models", server, log)
        cfg = load_config(ROOT / "configs" / "openai.yaml", [
            f"llm.base_url={base}/v1", "llm.model=simulated", f"llm.max_concurrency={args.slots}",
            f"self_instruct.num_instructions={args.tasks}", f"self_instruct.max_requests={args.tasks * 2}",
            f"evol_instruct.rounds={args.rounds}"])
        llm = OpenAILLM(cfg.llm.model, base_url=cfg.llm.base_url, mode=cfg.llm.mode,
                        max_concurrency=cfg.llm.max_concurrency, timeout_s=cfg.llm.request_timeout_s)
        seeds, _ = load_seeds(cfg.seeds, ROOT)
        figures = []
        (generated, si_stats), fig = _measure("self_instruct", base, lambda: generate_tasks(
            seeds, cfg.self_instruct, llm, cfg.run.seed))
        fig.update(kept=si_stats["kept"], kept_instances=si_stats["kept_instances"])
        figures.append(fig)
        import pandas as pd
        rows = pd.concat([seed_examples(seeds), generated], ignore_index=True)
        (evolved, ev_stats), fig = _measure("evol_instruct", base, lambda: evolve(
            rows, cfg.evol_instruct, llm, cfg.run.seed))
        fig.update(rows_in=len(rows), attempted=ev_stats["attempted"], kept=ev_stats["kept"])
        figures.append(fig)
        peer = None
        if args.peer_rows:
            sample = rows.head(args.peer_rows).reset_index(drop=True)
            (_, ours_stats), ours = _measure("evol_instruct (ours, peer rows)", base, lambda: evolve(
                sample, cfg.evol_instruct, llm, cfg.run.seed))
            ours.update(rows_in=len(sample), attempted=ours_stats["attempted"], kept=ours_stats["kept"])
            theirs = _peer(base, sample["instruction"].tolist(), args, cfg.evol_instruct)
            peer = {"workload": f"the first {len(sample)} rows of the evol input, {args.rounds} evolutions each",
                    "ours": ours, "distilabel": theirs}
        llm.close()
        total_s = sum(f["seconds"] for f in figures)
        ideal_s = sum(f["ideal_s"] for f in figures)
        print(json.dumps({
            "benchmark": "endpoint_scale", "tasks": args.tasks, "rounds": args.rounds,
            "endpoint": {"slots": args.slots, "ttft_s": args.ttft_s, "tokens_per_s": args.tokens_per_s,
                         "kind": "simulated vLLM-like server (tests/simulated_endpoint.py), own process"},
            "client": {"profile": "configs/openai.yaml (chat)", "max_concurrency": args.slots},
            "reference": "ideal_s: busy slot-seconds / slots (every slot busy from first request to last); "
                         "peer: distilabel 1.5.3 EvolInstruct on the same rows and server, same cap in flight",
            "stages": figures, "total_seconds": round(total_s, 2), "total_ideal_s": round(ideal_s, 2),
            "measured_over_ideal": round(total_s / ideal_s, 3) if ideal_s else None,
            "peak_rss_mb": _peak_rss_mb(), "peer": peer}, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
