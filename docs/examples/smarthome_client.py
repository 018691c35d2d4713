"""The smart-home dialogue against `edge-slm serve` with the openai client: the model turns a
command into a call, the program runs it, the model hears the result; a question gets text; a
JSON schema shapes a reply. docs/structured-output.md shows this file and its output.

    edge-slm serve export/x86-laptop --port 8080 &
    python docs/examples/smarthome_client.py http://127.0.0.1:8080/v1
"""

import json
import sys

from openai import OpenAI

from edge_slm.core.data import DATA_DIR

client = OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
# Lights and brightness: the first two functions of edge-slm's smart-home tool set, in OpenAI's format.
tools = json.loads((DATA_DIR / "smarthome" / "tools.json").read_text())[:2]
home = {"kitchen": 0, "living_room": 30, "garden": 0}  # brightness in percent


def run(call) -> str:
    """The program's side: execute the call, say what happened."""
    arguments = json.loads(call.function.arguments)
    room = arguments["room"]
    home[room] = arguments["level"] if call.function.name == "set_brightness" else 100 * arguments["on"]
    return f"the {room} lights are at {home[room]}%"


# Earlier turns of the dialogue: a 135M model follows the call format better for seeing it used.
messages = []
for n, (command, name, arguments) in enumerate(
    [
        ("turn on the lights in the bedroom", "set_lights", {"room": "bedroom", "on": True}),
        ("switch off the office lights", "set_lights", {"room": "office", "on": False}),
        ("dim the living room to 30 percent", "set_brightness", {"room": "living_room", "level": 30}),
    ]
):
    call = {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    messages += [
        {"role": "user", "content": command},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{n}", "content": "ok"},
        {"role": "assistant", "content": "Done."},
    ]

for said in ["it's too dark in the kitchen", "lights on in the garden", "what is the capital of France?"]:
    messages.append({"role": "user", "content": said})
    reply = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=60)
    message = reply.choices[0].message
    print(f"user: {said}\n  finish_reason: {reply.choices[0].finish_reason}")
    if message.tool_calls:
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            print(f"  call: {call.function.name}({call.function.arguments})")
            result = run(call)
            print(f"  result: {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=tools, temperature=0, max_tokens=30
        )
        message = reply.choices[0].message
    print(f"  assistant: {message.content}")
    messages.append({"role": "assistant", "content": message.content})

print(f"home: {home}")
schema = {
    "type": "object",
    "properties": {"rooms_lit": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
    "required": ["rooms_lit"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": f"The home is {json.dumps(home)}. Which rooms have their lights above 0?"}],
    response_format={"type": "json_schema", "json_schema": {"name": "lit", "schema": schema, "strict": True}},
    temperature=0,
    max_tokens=60,
)
print(f"json_schema reply: {reply.choices[0].message.content}")
