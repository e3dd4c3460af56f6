"""`llmrun serve --lora PATH[:SCALE][@ALIAS]`: adapters listed and set (`/lora-adapters`), chosen per request
(`"lora"`, or an alias as the model name), each answer equal to the Python API's `Llama(..., lora_path=)`
alone, with and without a concurrent request on another adapter; bad ids, scales and names are 4xx."""
from __future__ import annotations

import concurrent.futures
import warnings

import openai  # dev dependency; a missing one must fail, not skip
import pytest

from helpers.server import ServerProcess
from llmrun.api import Llama

warnings.filterwarnings("ignore", category=UserWarning)

QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]
MAX_TOKENS = 16
CTX = 512


def _peft_adapter(default_model, out, seed):
    """A rank-4 PEFT adapter on the default model's HF form, B random (large enough to change the answer)."""
    import torch
    from helpers.tiny_gguf import reference_model_from_gguf
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(reference_model_from_gguf(default_model),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-lora")
    return _peft_adapter(default_model, root / "a", 1), _peft_adapter(default_model, root / "b", 2)


@pytest.fixture(scope="module")
def server(default_model, adapters):
    a, b = adapters
    with ServerProcess(default_model, "--alias", "smol", "--parallel", "2", "--ctx", str(CTX),
                       "--lora", f"{a}@tune-a", "--lora", f"{b}:0.5@tune-b") as srv:
        yield srv


@pytest.fixture(scope="module")
def refs(default_model, adapters):
    """The Python API's greedy answers: base, adapter A at 1.0, adapter B at 0.5, A and B at 0.5 each."""
    a, b = adapters
    llm = Llama(default_model, n_ctx=CTX, n_threads=2, lora_path=a)

    def answer():
        return llm.create_chat_completion(QUESTION, temperature=0, max_tokens=MAX_TOKENS)["choices"][0]["message"]["content"]

    out = {"a": answer()}
    llm.set_lora([(b, 0.5)])
    out["b"] = answer()
    llm.set_lora([(a, 0.5), (b, 0.5)])
    out["ab"] = answer()
    llm.set_lora([])
    out["base"] = answer()
    # the adapters change the answer: the comparisons below mean something
    assert len({out["a"], out["b"], out["base"]}) == 3 and out["ab"] != out["base"], out
    return out


def _chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": MAX_TOKENS,
                                                  **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_list_and_set_global_scales(server, adapters, refs):
    a, b = adapters
    with server.client() as c:
        assert c.get("/lora-adapters").json() == [
            {"id": 0, "path": str(a), "scale": 0.0, "alias": "tune-a"},   # aliased: chosen by name only
            {"id": 1, "path": str(b), "scale": 0.0, "alias": "tune-b"}]
        assert _chat(c) == refs["base"]
        assert c.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}]).json() == {"success": True}
        assert [x["scale"] for x in c.get("/lora-adapters").json()] == [1.0, 0.0]
        assert _chat(c) == refs["a"]
        assert _chat(c, model="smol") == refs["a"]
        assert c.post("/lora-adapters", json=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.5}]).status_code == 200
        assert _chat(c) == refs["ab"]
        assert c.post("/lora-adapters", json=[]).json() == {"success": True}
        assert [x["scale"] for x in c.get("/lora-adapters").json()] == [0.0, 0.0]
        assert _chat(c) == refs["base"]


def test_per_request_lora_equals_python_api(server, refs):
    with server.client() as c:
        assert _chat(c, lora=[{"id": 1, "scale": 0.5}]) == refs["b"]
        assert _chat(c, lora=[{"id": 0, "scale": 1.0}]) == refs["a"]
        assert _chat(c, lora=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.5}]) == refs["ab"]
        assert _chat(c, lora=[]) == refs["base"]
        assert _chat(c, model="tune-a", lora=[]) == refs["base"]   # the explicit list wins over the alias
        assert _chat(c) == refs["base"]                             # and set nothing for later requests


def test_alias_as_model_name_with_openai_client(server, refs):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == ["smol", "tune-a", "tune-b"]
        assert client.models.retrieve("tune-b").id == "tune-b"
        for name, ref in (("tune-a", "a"), ("tune-b", "b"), ("smol", "base")):
            out = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
            assert out.model == name and out.choices[0].message.content == refs[ref]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tune-c", messages=QUESTION, max_tokens=2)
    with server.client() as c:
        assert [m["name"] for m in c.get("/api/tags").json()["models"]] == ["smol", "tune-a", "tune-b"]

        def ollama_chat(**body):   # Ollama's own sampling defaults: compared with each other
            r = c.post("/api/chat", json={"messages": QUESTION, "stream": False,
                                          "options": {"temperature": 0, "num_predict": MAX_TOKENS}, **body})
            assert r.status_code == 200, r.text
            return r.json()["message"]["content"]

        tuned = ollama_chat(model="tune-a:latest")
        assert tuned == ollama_chat(model="smol", lora=[{"id": 0, "scale": 1.0}])
        assert c.post("/api/chat", json={"model": "tune-c", "messages": QUESTION}).status_code == 404


def test_concurrent_requests_with_different_adapters_equal_each_alone(server, refs):
    names = ["tune-a", "tune-b", "smol", "tune-a"]
    want = [refs["a"], refs["b"], refs["base"], refs["a"]]
    with server.client() as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        steps = c.get("/health").json()["steps"]
        got = list(pool.map(lambda name: _chat(c, model=name), names))
        assert got == want
        # 4 answers of MAX_TOKENS tokens: more forwards than one shared batch would need
        assert c.get("/health").json()["steps"] - steps > MAX_TOKENS
    server.wait_idle()


@pytest.mark.parametrize("body, status, param", [
    ({"lora": [{"id": 2, "scale": 1.0}]}, 400, "lora"),
    ({"lora": [{"id": -1, "scale": 1.0}]}, 400, "lora"),
    ({"lora": [{"id": "0", "scale": 1.0}]}, 400, "lora"),
    ({"lora": [{"id": 0, "scale": "1"}]}, 400, "lora"),
    ({"lora": [{"id": 0, "scale": 1e9}]}, 400, "lora"),
    ({"lora": [{"id": 0, "scale": 1}, {"id": 0, "scale": 2}]}, 400, "lora"),
    ({"lora": [{"id": 0, "scale": 1, "x": 1}]}, 400, "lora"),
    ({"lora": {"id": 0}}, 400, "lora"),
    ({"lora": [7]}, 400, "lora"),
    ({"model": "no-such-tune"}, 404, "model"),
    ({"model": 5}, 400, "model"),
])
def test_bad_adapter_choices_are_4xx(server, body, status, param):
    with server.client() as c:
        for path in ("/v1/chat/completions", "/v1/completions"):
            prompt = {"messages": QUESTION} if "chat" in path else {"prompt": "Hi"}
            r = c.post(path, json={**prompt, "max_tokens": 2, **body})
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("body", [{"id": 0, "scale": 1}, [{"id": 9, "scale": 1}], [{"id": 0, "scale": None}],
                                  [{"id": 0, "scale": True}], "x"])
def test_bad_global_scales_are_400_and_change_nothing(server, body):
    with server.client() as c:
        before = c.get("/lora-adapters").json()
        r = c.post("/lora-adapters", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"]
        assert c.get("/lora-adapters").json() == before
