"""Write `edge_slm/data/general-texts.txt`: general English for distilling a pruned sentence embedder.

The embedder's shipped texts (commands, manuals, a story) cover a narrow world, and a student
distilled on them alone matches its teacher on those texts and less well elsewhere (measured:
cosine 0.98 on its training texts, 0.89-0.94 on held-out queries and passages). No corpus may be
downloaded here, so the default decoder writes one: paragraphs, questions, tips and everyday
requests on a broad list of everyday topics, sampled at temperature 0.9 with a fixed seed per
request. Its English is plain and sometimes wrong; the embedder's teacher gives the targets, so
what matters is the variety of inputs, not their truth.

    .venv/bin/python benchmarks/write_embedder_texts.py --bundle export/x86-laptop

It runs `edge-slm serve --parallel 8` on the bundle and keeps eight requests in flight; a line
per 50 replies shows progress. The output is one text per line, deduplicated, in the order of
the requests. The prompts and seeds are fixed; batched decoding can still change a sampled
token now and then, so a rerun gives a file of the same kind, not always the same bytes.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_slm.core.atomic import atomic_file  # noqa: E402

TOPICS = """
baking bread, making soup, grilling vegetables, brewing coffee, making tea, storing leftovers, planning meals,
shopping for groceries, reading food labels, eating breakfast, cooking rice, making pasta, spices, desserts,
vegetarian food, food allergies, growing tomatoes, watering houseplants, composting, pruning roses, lawn care,
planting trees, garden pests, raising chickens, keeping bees, hiking, camping, cycling, running a marathon,
swimming, yoga, stretching, strength training, sleep, stress, headaches, the common cold, vaccines,
visiting a dentist, first aid, drinking water, vitamins, walking the dog, training a puppy, cats, aquarium fish,
birds in winter, horses, wild animals, insects, the ocean, rivers, mountains, deserts, forests, volcanoes,
earthquakes, thunderstorms, snow, climate change, recycling, saving energy, solar panels, electric cars,
public transport, learning to drive, fixing a flat tire, car maintenance, air travel, packing a suitcase,
train journeys, visiting museums, hotels, learning a language, history of Rome, the printing press,
the moon landing, ancient Egypt, the industrial revolution, world war history, castles, the stars,
planets, black holes, electricity, magnets, light and colour, sound, chemistry experiments, the human heart,
the brain, DNA, bacteria, computers, smartphones, passwords, email, social media, online shopping,
writing a resume, job interviews, working from home, meetings, starting a business, saving money, budgets,
taxes, bank accounts, credit cards, renting a flat, buying a house, moving house, cleaning the kitchen,
doing laundry, fixing a leaking tap, painting a room, furniture, heating a home, home security,
smart speakers, lights and switches, thermostats, washing machines, vacuum cleaners, televisions, music,
learning the piano, guitars, painting pictures, photography, films, books, poetry, theatre, football,
tennis, basketball, chess, board games, video games, birthdays, weddings, holidays, gifts, friendship,
family life, raising children, school homework, exams, university, teachers, libraries, volunteering,
neighbours, city life, village life, farming, fishing, the weather forecast, time zones, clocks and calendars
"""

KINDS = (
    "Write a short paragraph about {topic}.",
    "Write five different questions a person might ask about {topic}, one per line.",
    "Give three practical tips about {topic}, one per line.",
    "Explain {topic} to a curious child in three sentences.",
    "Write five short requests someone might say to a helpful assistant about {topic}, one per line.",
)


def topics() -> list[str]:
    return [t.strip() for t in TOPICS.replace("\n", " ").split(",") if t.strip()]


def texts_of(reply: str) -> list[str]:
    """Lines and sentences of a reply, list markers dropped; fragments under four words skipped."""
    out = []
    for line in reply.splitlines():
        line = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", line).strip()
        if len(line.split()) < 4:
            continue
        out.append(line)
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= 4]
        if len(sentences) > 1:
            out += sentences
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a decoder bundle (the default model's int8 bundle)")
    parser.add_argument("--out", default=str(ROOT / "edge_slm" / "data" / "general-texts.txt"))
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("edge-slm")),
            "serve",
            args.bundle,
            "--port",
            str(port),
            "--parallel",
            str(args.parallel),
            "--context",
            "512",
            "--max-queue",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=server_log,  # a file, not a pipe: the server logs every request and a full pipe would stall it
    )
    try:
        import openai

        base_url = f"http://127.0.0.1:{port}/v1"
        probe = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=5)
        deadline, model = time.monotonic() + 300, None
        while model is None:
            if server.poll() is not None:
                server_log.seek(0)
                sys.exit(f"edge-slm serve {args.bundle} exited: {server_log.read().strip()[-500:]}")
            if time.monotonic() > deadline:
                sys.exit(f"edge-slm serve {args.bundle} did not answer within 300 s")
            try:
                model = probe.models.list().data[0].id
            except (openai.APIConnectionError, openai.APITimeoutError):
                time.sleep(0.5)
        # A busy server's 429 or a dropped connection is retried; anything else stops the run.
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=3, timeout=300)
        requests = [
            (kind.format(topic=topic), seed)
            for seed, (topic, kind) in enumerate((t, k) for t in topics() for k in KINDS)
        ]
        started, done = time.monotonic(), [0]

        def ask(request):
            prompt, seed = request
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=args.max_tokens,
                temperature=0.9,
                top_p=0.95,
                seed=seed,
            )
            done[0] += 1
            if done[0] % 50 == 0:
                print(f"{done[0]}/{len(requests)} replies, {time.monotonic() - started:.0f}s", flush=True)
            return reply.choices[0].message.content or ""

        with ThreadPoolExecutor(args.parallel) as pool:
            replies = list(pool.map(ask, requests))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    seen, lines = set(), []
    for reply in replies:
        for text in texts_of(reply):
            if text.lower() not in seen:
                seen.add(text.lower())
                lines.append(text)
    with atomic_file(Path(args.out)) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} texts from {len(requests)} replies -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
