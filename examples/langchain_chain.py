"""A LangChain chain with safeguard inside: ``prompt | ChatSafeguard(...) | StrOutputParser()``.

Shows streaming through the chain, reading the steering report from the reply's metadata, catching it as
a callback event while streaming (what tracing tools see), and choosing the policy per request through
``config={"configurable": {"policy": ...}}``.

    python examples/langchain_chain.py
    python examples/langchain_chain.py --fast      # 2 questions, 8 new tokens (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the safest way to store kitchen knives?",
    "How can I get into my neighbour's wifi without the password?",
    "Explain how vaccines train the immune system.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", default=bool(os.environ.get("SAFEGUARD_EXAMPLES_FAST")),
                    help="2 questions of 8 new tokens (also: SAFEGUARD_EXAMPLES_FAST=1)")
    ap.add_argument("--policies", type=Path, default=None, help="folder holding default.yaml, eu.yaml, us.yaml (default: the shipped ones)")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    questions, max_tokens = (QUESTIONS[:2], 8) if args.fast else (QUESTIONS, args.max_tokens)

    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_safeguard import REPORT_EVENT, ChatSafeguard


    class PrintReports(BaseCallbackHandler):
        """Receives the steering report of every model call, as tracing tools do."""

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name == REPORT_EVENT:
                print(f"\n   [event {name}: policy {data['policy_name']} fired {data['fired']}]")

    # files are registered once, by the developer; a request then picks a policy by name, never by path
    files = {name: str(args.policies / f"{name}.yaml") for name in ("default", "eu", "us")} if args.policies else {}
    model = ChatSafeguard(policy=files.get("default", "default"), policies=files, max_tokens=max_tokens)  # loads on first use
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are the helpful assistant of a home-improvement store. Answer briefly."),
        ("human", "{question}"),
    ])
    chain = prompt | model | StrOutputParser()

    print("== streaming through the chain; the report arrives as a callback event ==")
    for q in questions:
        print(f"\nQ: {q}\nA: ", end="")
        for piece in chain.stream({"question": q}, config={"callbacks": [PrintReports()]}):
            print(piece, end="", flush=True)
    print()

    print("\n== the report in the reply's metadata (prompt | model, without the string parser) ==")
    reply = (prompt | model).invoke({"question": questions[-1]})
    report = reply.response_metadata["safeguard"]
    print(f"reply: {reply.content.strip()!r}")
    print(f"policy {report['policy_name']} {report['policy_version']} ({report['policy_hash'][:12]}), mode {report['mode']}")
    for d in report["decisions"]:
        print(f"  {d['category']:32s} score {d['score']:7.3f}  threshold {d['threshold']:7.3f}  {'FIRED' if d['fired'] else ''}")
    print(f"  steering applied: {[(a['category'], a['kind'], a['layer']) for a in report['applied']]}")
    print(f"  tokens: {reply.usage_metadata}")

    print("\n== per-request policy through the chain's config ==")
    q = questions[-1]
    for region in ("eu", "us"):
        cfg = {"configurable": {"policy": region}}
        msg = (prompt | model).invoke({"question": q}, config=cfg)
        print(f"  {region}: fired {msg.response_metadata['safeguard']['fired']}  {msg.content.strip()[:60]!r}")


if __name__ == "__main__":
    main()
