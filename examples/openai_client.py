"""Talk to ``python -m seqlease serve`` with the official ``openai`` package.

Start the server first (``pip install '.[web]'``)::

    python -m seqlease serve --sequences 4

then run this file. ``$OPENAI_BASE_URL`` points it at another address
(default ``http://127.0.0.1:8000/v1``).
"""

from __future__ import annotations

import asyncio
import json
import os

from openai import AsyncOpenAI, OpenAI
from openai.types.shared_params import ResponseFormatJSONSchema

BASE_URL = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
# The server checks no key, but the client wants one.
client = OpenAI(base_url=BASE_URL, api_key="unused")

# The one model the server serves (any name is accepted in requests).
model = client.models.list().data[0].id
print("model:", model)

# A whole reply, with the token counts (cached_tokens: prompt tokens copied from memory).
reply = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a river in Europe."},
    ],
    max_tokens=24,
    temperature=0,
)
print("reply:", reply.choices[0].message.content)
assert reply.usage is not None
print("usage:", reply.usage.prompt_tokens, "prompt,", reply.usage.completion_tokens, "generated")

# A streamed reply: chunks as the model produces them.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count from 1 to 5."}],
    max_tokens=24,
    stream=True,
)
print("stream: ", end="")
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# A reply held to a JSON schema (a grammar built from it constrains every token).
schema: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}
place: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {"name": "place", "schema": schema},
}
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
    max_tokens=60,
    response_format=place,
)
print("json:", json.loads(reply.choices[0].message.content or ""))


# Concurrent requests from asyncio: they decode together, one sequence each.
async def ask_all(questions: list[str]) -> list[str]:
    """Send every question at once; the answers in the same order."""
    async with AsyncOpenAI(base_url=BASE_URL, api_key="unused") as aclient:
        replies = await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=16,
                )
                for question in questions
            )
        )
    return [r.choices[0].message.content or "" for r in replies]


for answer in asyncio.run(ask_all(["What is 2 + 2?", "Name a colour.", "Name a fruit."])):
    print("async:", answer)
