"""POST /v1/embeddings on a real server (the `modal_server` fixture: the default
chat model with the packaged all-MiniLM-L6-v2), through the official openai
client and raw HTTP; every good response validated against OpenAI's schema."""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
import openai
import pytest
from live_server import LiveServer
from openai_schema import check

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def post(server: LiveServer, body: dict[str, Any]) -> Any:
    with server.http() as http:
        return http.post("/v1/embeddings", json=body)


def embedder(server: LiveServer) -> Any:
    return server.app.state.server.models.find(EMBEDDER).serving.engine.embedder


def test_float_vectors_match_the_embedder_and_the_schema(modal_server: LiveServer) -> None:
    res = post(modal_server, {"model": EMBEDDER, "input": SENTENCES})
    assert res.status_code == 200
    body = res.json()
    check("CreateEmbeddingResponse", body)
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["model"] == EMBEDDER
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    direct = embedder(modal_server).embed_texts(SENTENCES)
    cos = (got * direct.vectors).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(direct.vectors, axis=1)
    assert cos.min() > 0.9999
    assert body["usage"] == {
        "prompt_tokens": sum(direct.token_counts),
        "total_tokens": sum(direct.token_counts),
    }
    # related sentences are closer than unrelated ones: the vectors carry meaning
    assert got[0] @ got[1] > got[0] @ got[2] + 0.2


def test_openai_client_base64_and_float_agree(modal_client: openai.OpenAI) -> None:
    # the client asks for base64 by default and decodes it into floats
    b64 = modal_client.embeddings.create(model="default-embedding", input="hello world")
    flt = modal_client.embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float"
    )
    assert len(b64.data[0].embedding) == 384
    np.testing.assert_allclose(b64.data[0].embedding, flt.data[0].embedding, rtol=0, atol=1e-6)


def test_base64_is_little_endian_float32(modal_server: LiveServer) -> None:
    body = post(
        modal_server, {"model": EMBEDDER, "input": ["one", "two"], "encoding_format": "base64"}
    ).json()
    # OpenAI's schema lists only the float form; with base64 its API sends the string
    # (what its client decodes), so the schema checks the body with the strings decoded
    decoded = [
        {**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()}
        for d in body["data"]
    ]
    check("CreateEmbeddingResponse", {**body, "data": decoded})
    flt = post(modal_server, {"model": EMBEDDER, "input": ["one", "two"]}).json()
    for b, f in zip(body["data"], flt["data"], strict=True):
        v = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_allclose(v, f["embedding"], atol=1e-6)


def test_token_id_inputs_give_the_texts_vectors(modal_server: LiveServer) -> None:
    ids = embedder(modal_server).tokenize(SENTENCES[:2])
    by_text = post(modal_server, {"model": EMBEDDER, "input": SENTENCES[:2]}).json()
    by_ids = post(modal_server, {"model": EMBEDDER, "input": ids}).json()
    one_row = post(modal_server, {"model": EMBEDDER, "input": ids[0]}).json()
    check("CreateEmbeddingResponse", by_ids)
    for a, b in zip(by_text["data"], by_ids["data"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)
    np.testing.assert_allclose(one_row["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)
    assert by_ids["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


def test_truncate_sequence_cuts_long_inputs(modal_server: LiveServer) -> None:
    long_text = "word " * 400  # over MiniLM's 256 tokens
    refused = post(modal_server, {"model": EMBEDDER, "input": long_text})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    assert "truncate_sequence" in refused.json()["error"]["message"]
    cut = post(modal_server, {"model": EMBEDDER, "input": long_text, "truncate_sequence": True}).json()
    assert cut["usage"]["prompt_tokens"] == 256
    long_ids = [1000] * 300
    assert post(modal_server, {"model": EMBEDDER, "input": [long_ids]}).status_code == 400
    assert (
        post(modal_server, {"model": EMBEDDER, "input": [long_ids], "truncate_sequence": True}).status_code
        == 200
    )


def test_matryoshka_dimensions_truncate_and_renormalize(modal_server: LiveServer) -> None:
    full = np.array(
        post(modal_server, {"model": "minilm-mrl", "input": "a cat"}).json()["data"][0]["embedding"]
    )
    body = post(modal_server, {"model": "minilm-mrl", "input": "a cat", "dimensions": 128}).json()
    check("CreateEmbeddingResponse", body)
    cut = np.array(body["data"][0]["embedding"])
    assert cut.shape == (128,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    np.testing.assert_allclose(cut, full[:128] / np.linalg.norm(full[:128]), atol=1e-6)
    bad = post(modal_server, {"model": "minilm-mrl", "input": "a cat", "dimensions": 100})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),  # OpenAI refuses an empty string
        ({"input": []}, "input"),  # and an empty list
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [[1, 2, 10**9]]}, "input"),  # a token id outside the vocabulary
        ({"input": ["x"] * 2049}, "input"),  # OpenAI's limit on items
        ({"input": "x", "dimensions": 128}, "dimensions"),  # MiniLM declares no Matryoshka sizes
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": 12.5}, "input"),
        ({"input": "x", "model": "default"}, "model"),  # a chat model: the wrong kind
        ({"input": "x", "model": "whisper-1"}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    modal_server: LiveServer, body: dict[str, Any], param: str
) -> None:
    res = post(modal_server, {"model": EMBEDDER, **body})
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_unknown_model_is_a_404(modal_server: LiveServer) -> None:
    res = post(modal_server, {"model": "no-such-embedder", "input": "x"})
    assert res.status_code == 404 and res.json()["error"]["param"] == "model"


def test_concurrent_requests_batch_and_each_gets_its_rows(modal_server: LiveServer) -> None:
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(40)]
    alone = np.array(
        [d["embedding"] for d in post(modal_server, {"model": EMBEDDER, "input": texts}).json()["data"]]
    )
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = post(modal_server, {"model": EMBEDDER, "input": texts[i * 4 : i * 4 + 4]}).json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(10):
        got = np.array([d["embedding"] for d in results[i]["data"]])
        np.testing.assert_allclose(got, alone[i * 4 : i * 4 + 4], atol=1e-4)
