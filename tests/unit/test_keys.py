"""Artifact keys mean exactly what was computed: models by content, operational settings out, every piece
of code a stage runs in, and comments and docstrings not."""

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import Config, EvaluateConfig, FinetuneConfig, load_config
from tasks.stages import STAGES
from tests.conftest import ROOT
from tests.unit.test_finetune import mixed_frame

TINY = ROOT / "configs" / "tiny.yaml"


def key_of(stage: str, cfg: Config) -> str:
    return json.dumps(STAGES[stage].key_config(cfg), sort_keys=True)


# --- code: hashed as code, every module and glue function a stage runs --------------------------------

VERSIONS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tasks.stages import STAGES
print(json.dumps({name: spec.version() for name, spec in STAGES.items()}))
"""


def _versions(tree) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", VERSIONS, str(tree)], capture_output=True, text=True, check=True,
                         cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_code_keys_follow_code_not_comments_and_cover_model_loading_and_glue(tmp_path):
    tree = tmp_path / "copy"
    shutil.copytree(ROOT / "tasks", tree / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    base = _versions(tree)
    assert len(set(base.values())) == len(base)  # every stage runs different code

    # Comments and docstrings, in a module every model stage runs and in the glue: no stage re-keyed.
    _edit(tree / "tasks" / "llm" / "models.py", '"""Where model weights come from', '"""Where the weights come from')
    _edit(tree / "tasks" / "llm" / "models.py", "def bundled_model_dir() -> Path:\n",
          "def bundled_model_dir() -> Path:  # a comment\n    # and another\n")
    _edit(tree / "tasks" / "stages.py", '"""Run `stage` into its planned', '"""Run the stage `stage` into its planned')
    _edit(tree / "tasks" / "stages.py", "def _run_mix(", "# mixing\ndef _run_mix(")
    assert _versions(tree) == base

    # The GGUF conversion (tasks/llm/models.py) re-keys the stages that load models; the glue of one stage
    # (its run function in tasks/stages.py) re-keys that stage alone.
    _edit(tree / "tasks" / "llm" / "models.py", 'CONVERSION_VERSION = "v2"', 'CONVERSION_VERSION = "v3"')
    _edit(tree / "tasks" / "stages.py", "table, stats, mixed = mix.mix(rows, cfg.mix)",
          "table, stats, mixed = mix.mix(rows.copy(), cfg.mix)")
    after = _versions(tree)
    changed = {name for name in base if after[name] != base[name]}
    assert changed == {"self_instruct", "evol_instruct", "quality", "finetune", "evaluate", "mix"}
    assert after["seeds"] == base["seeds"]


# --- models: by content, not by name or path ----------------------------------------------------------

def test_a_local_model_is_keyed_by_its_files_not_its_path(tiny_model_dir, tmp_path):
    copy = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, copy)
    cfg = lambda model: load_config(TINY, [f"llm.model={model}"])  # noqa: E731
    for stage in ("self_instruct", "evol_instruct", "quality", "finetune", "evaluate"):
        assert key_of(stage, cfg(tiny_model_dir)) == key_of(stage, cfg(copy)), stage

    (copy / "README.md").write_text("a model card says nothing about the weights\n")
    assert key_of("finetune", cfg(copy)) == key_of("finetune", cfg(tiny_model_dir))

    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3  # retrained in place: same path, other weights
    from safetensors.torch import save_file
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    for stage in ("self_instruct", "evol_instruct", "quality", "finetune", "evaluate"):
        assert key_of(stage, cfg(tiny_model_dir)) != key_of(stage, cfg(copy)), stage


class _ModelsServer(ThreadingHTTPServer):
    report: list[dict]


class _Models(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"object": "list", "data": self.server.report}).encode()
        self.send_response(200 if self.path.endswith("/models") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def models_server():
    servers = []

    def start(report):
        server = _ModelsServer(("127.0.0.1", 0), _Models)
        server.report = report
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()


def _vllm_entry(root, created, perm):
    return {"id": "served", "object": "model", "created": created, "owned_by": "vllm", "root": root,
            "parent": None, "max_model_len": 4096, "permission": [{"id": perm, "created": created}]}


def test_an_endpoint_model_is_keyed_by_what_the_server_reports(models_server, tmp_path):
    server, url = models_server([_vllm_entry("/models/a", 1, "modelperm-1")])
    other_server, other_url = models_server([_vllm_entry("/models/a", 2, "modelperm-2")])

    def cfg(base_url):
        return load_config(ROOT / "configs" / "openai.yaml",
                           [f"llm.base_url={base_url}", "llm.model=served", f"finetune.base_model={tmp_path}"])

    first = key_of("self_instruct", cfg(url))
    # vLLM's `created` is the time of the request and its permission ids are fresh each time; another
    # host serving the same weights is the same model.
    assert key_of("self_instruct", cfg(url)) == first == key_of("self_instruct", cfg(other_url))
    server.report = [_vllm_entry("/models/b", 1, "modelperm-1")]  # restarted with other weights
    assert key_of("self_instruct", cfg(url)) != first
    server.report = [{"id": "x.gguf", "object": "model", "owned_by": "me"}]  # llama.cpp lists its one file
    assert "x.gguf" in key_of("self_instruct", cfg(url))


def test_an_unreachable_endpoint_is_named(tmp_path):
    from tasks.llm.openai_backend import LLMRequestError

    cfg = load_config(ROOT / "configs" / "openai.yaml", ["llm.base_url=http://127.0.0.1:9/v1", "llm.model=m",
                                                         f"finetune.base_model={tmp_path}", "llm.max_retries=0"])
    with pytest.raises(LLMRequestError, match="127.0.0.1:9/v1: cannot list its models to identify `m`"):
        key_of("self_instruct", cfg)


# --- operational settings: out of the key, and shown not to change what is learned ---------------------

@pytest.mark.parametrize("change", [
    ["finetune.processes=2", "finetune.grad_accum=1"],  # two GPUs where there were one accumulating twice
    ["finetune.processes=2", "finetune.grad_accum=1", "finetune.checkpoint_every=7", "finetune.compile=true",
     "finetune.gradient_checkpointing=true", "finetune.logit_chunk=64"],  # every operational setting at once
    ["finetune.checkpoint_every=7", "finetune.grad_accum=2"], ["finetune.compile=true", "finetune.grad_accum=2"],
    ["finetune.gradient_checkpointing=true", "finetune.grad_accum=2"],
    ["finetune.logit_chunk=64", "finetune.grad_accum=2"],
])
def test_how_training_runs_is_not_in_the_key(change):
    base = load_config(TINY, ["finetune.grad_accum=2"])
    assert key_of("finetune", load_config(TINY, change)) == key_of("finetune", base)


@pytest.mark.parametrize("change", [["finetune.batch_size=2"], ["finetune.grad_accum=3"], ["finetune.processes=3"],
                                    ["finetune.learning_rate=0.001"], ["finetune.packing=false"],
                                    ["finetune.max_length=64"], ["run.seed=8"]])
def test_what_decides_the_weights_is_in_the_key(change):
    assert key_of("finetune", load_config(TINY, change)) != key_of("finetune", load_config(TINY))


def test_operational_settings_learn_the_same_and_batch_size_does_not(tiny_model_dir, tmp_path):
    """Why the key holds `batch_size` and leaves `logit_chunk` and `checkpoint_every` out."""
    base = dict(max_steps=4, batch_size=2, row_tokens=64, learning_rate=3e-3, warmup_ratio=0.0, max_length=48,
                train_embeddings=False, device="cpu", checkpoint_every=None)
    runs = {"base": {}, "operational": {"logit_chunk": 64, "checkpoint_every": 1}, "batch_size": {"batch_size": 1}}
    weights = {}
    for name, extra in runs.items():
        from tasks.finetune import finetune
        finetune(mixed_frame(), FinetuneConfig(**{**base, **extra}), EvaluateConfig(batch_size=4), tiny_model_dir,
                 tmp_path / name, seed=0)
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    for key in weights["base"]:
        torch.testing.assert_close(weights["operational"][key], weights["base"][key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(weights["batch_size"][k], weights["base"][k]) for k in weights["base"])
