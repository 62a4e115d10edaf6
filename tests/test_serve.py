"""pipeline.serve: the official openai client against the server on localhost gets the trained model's greedy
answers (plain and streamed), the model list, and clear 400/404 errors; requests at once are served in turn."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from transformers import AutoTokenizer

from pipeline.eval.generation import greedy_answers
from pipeline.tools import synthetic
from tests.helpers import REPO

NAME = "tiny-sft"
HELDOUT = synthetic.split_items()[1]


@pytest.fixture(scope="module")
def base_url(sft_model, tmp_path_factory):
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--model", str(sft_model), "--port", "0",
                             "--served_model_name", NAME, "--max_new_tokens", "16"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/v1 ..." once it listens
        assert "http://" in line, f"server did not start: {open(log.name).read()[-3000:]}"
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def ask(item: str, lang: str = "en") -> list[dict]:
    return [{"role": "user", "content": synthetic.question(item, lang)}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_is_the_greedy_answer(client, sft_model):
    messages = ask(HELDOUT[1])
    response = client.chat.completions.create(model=NAME, messages=messages)
    choice = response.choices[0]
    assert choice.message.content == greedy_answers(str(sft_model), [messages])[0] == synthetic.answer(HELDOUT[1])
    assert choice.message.role == "assistant" and choice.finish_reason == "stop" and response.object == "chat.completion"
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer = tokenizer(choice.message.content, add_special_tokens=False).input_ids
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(answer) + 1  # the answer and the <|im_end|> that ends it
    assert response.usage.total_tokens == len(prompt) + len(answer) + 1
    short = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


def test_streaming_sends_the_same_answer_in_chunks(client, sft_model):
    messages = [{"role": "system", "content": "Answer with one word."}] + ask(HELDOUT[2], "zh")
    plain = client.chat.completions.create(model=NAME, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    assert text == plain == greedy_answers(str(sft_model), [messages])[0] == synthetic.answer(HELDOUT[2], "zh")
    assert [c.choices[0].finish_reason for c in with_choice][-1] == "stop"
    assert chunks[-1].usage.completion_tokens >= 2 and not chunks[-1].choices


def test_sampling_and_requests_at_once(client):
    items = HELDOUT[3:7]
    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(pool.map(lambda i: client.chat.completions.create(model=NAME, messages=ask(i)).choices[0].message.content,
                                items))
    assert answers == [synthetic.answer(i) for i in items]
    # sampling honours the token budget: the trained model's answer starts with a colour word, never with its
    # end of turn, so one token is always cut off by the length limit
    sampled = client.chat.completions.create(model=NAME, messages=ask(items[0]), temperature=1.0, top_p=0.9, max_tokens=1)
    assert sampled.choices[0].finish_reason == "length" and sampled.usage.completion_tokens == 1


def test_bad_requests_get_clear_errors(client, base_url):
    with pytest.raises(openai.BadRequestError, match="must be a non-empty list"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        client.chat.completions.create(model=NAME, messages=ask(HELDOUT[0]) + [{"role": "assistant", "content": "red"}])
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        client.chat.completions.create(model=NAME, messages=ask(HELDOUT[0]), temperature=2.5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=ask(HELDOUT[0]))
    request = urllib.request.Request(f"{base_url}/chat/completions", data=b'{"messages": [', method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
