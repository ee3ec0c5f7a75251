"""The peer arm of benchmarks/endpoint_scale.py: distilabel's EvolInstruct on the same rows and endpoint.

Run by endpoint_scale.py with the python of the separate venv it makes for distilabel (its pins may clash
with ours); not imported by the project. Reads the instructions (a JSON list) from `--rows`, evolves each
`--rounds` times and answers every evolution (`num_evolutions`, `store_evolutions=True`, `generate_answers=True`,
as our stage answers every kept evolution; with `store_evolutions=False` and more than one evolution,
distilabel 1.5.3's `process` fails with an IndexError pairing answers to rows), in batches of
`--batch` rows, as distilabel's EvolInstruct task does inside a pipeline step (each batch's requests all in
flight at once through distilabel's OpenAILLM, one evolution round after the other). Prints one JSON line.
"""

import argparse
import json
import resource
import time


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="simulated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    import distilabel
    from distilabel.models import OpenAILLM
    from distilabel.steps.tasks import EvolInstruct

    with open(args.rows) as f:
        instructions = json.load(f)
    llm = OpenAILLM(model=args.model, base_url=args.base_url, api_key="not-needed", max_retries=6, timeout=120,
                    generation_kwargs={"max_new_tokens": args.max_new_tokens, "temperature": args.temperature})
    task = EvolInstruct(llm=llm, num_evolutions=args.rounds, store_evolutions=True, generate_answers=True,
                        input_batch_size=args.batch, seed=0)
    task.load()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    answered = 0
    for start in range(0, len(instructions), args.batch):
        batch = [{"instruction": text} for text in instructions[start:start + args.batch]]
        for out in task.process(batch):
            answered += sum(sum(1 for a in row.get("answers") or [] if a) for row in out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peer": f"distilabel {distilabel.__version__} EvolInstruct", "rows": len(instructions),
                      "num_evolutions": args.rounds, "input_batch_size": args.batch, "answers": answered,
                      "seconds": round(seconds, 2), "client_cpu_s": round(_cpu_s() - cpu0, 2)}))


if __name__ == "__main__":
    main()
