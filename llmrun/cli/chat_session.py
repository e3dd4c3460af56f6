"""The interactive loop behind `llmrun chat`: read a line, stream the answer, keep the conversation.

Works the same on a terminal and with piped stdin (a script writing lines; EOF or /exit ends it, exit 0).
The KV cache is reused across turns: each new prompt shares the previous turns as a prefix, so only the new
user turn (plus the template's glue) is evaluated. When the window fills, the oldest turns are dropped
(context shift; the system prompt stays). Ctrl-C while an answer streams stops that answer only.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from ..errors import ContextFullError
from .signals import sigint_cancels

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt + reset), /exit"


class ChatSession:
    def __init__(self, llm, system: str | None = None, sampling: dict | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.llm = llm
        self.system = system
        self.sampling = dict(sampling or {})
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty()
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _note(self, text: str) -> None:
        # Notes go to stderr (dim on a terminal) so stdout carries only the answers.
        if self.stderr.isatty():
            text = f"\x1b[2m{text}\x1b[0m"
        print(text, file=self.stderr, flush=True)

    def _read(self) -> str | None:
        if self.interactive and self.stdin is sys.stdin and self.stdout is sys.stdout:
            try:
                import readline  # noqa: F401  (terminal only: gives input() line editing and history)
            except ImportError:
                pass
            try:
                return input("> ")
            except EOFError:
                self.stdout.write("\n")
                return None
        if self.interactive:
            self.stdout.write("> ")
            self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def run(self) -> int:
        if self.interactive:
            self._note(f"llmrun chat: {HELP}; Ctrl-C stops an answer")
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                self.stdout.write("\n")
                return 0
            if line is None:
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/exit", "/quit", "/bye"):
                    return 0
                if cmd == "/reset":
                    self.reset()
                    self._note("(conversation reset)")
                elif cmd == "/system":
                    self.system = arg.strip() or None
                    self.reset()
                    self._note("(new system prompt; conversation reset)" if self.system
                               else "(system prompt cleared; conversation reset)")
                else:
                    self._note(f"unknown command {cmd}; {HELP}")
                continue
            self.answer(line)

    def _answer_room(self) -> int:
        """Tokens kept free for the answer: the -n limit, else a quarter of the window."""
        n_ctx, limit = self.llm.n_ctx(), self.sampling.get("max_tokens")
        return min(limit if limit else n_ctx // 4, n_ctx // 2)

    def _shift_context(self) -> int | None:
        """Drop the oldest turns (never the system prompt or the new message) until the prompt and room for
        the answer fit in the window, like llama.cpp's context shift. The prompt's size, or None if even the
        new message alone does not fit."""
        llm, dropped = self.llm, 0
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        while True:
            n_prompt = len(llm.chat_tokens(self.messages))
            if n_prompt + self._answer_room() <= llm.n_ctx() or len(self.messages) - first <= 1:
                break
            # a user turn and the answer after it go together
            drop = 2 if len(self.messages) - first > 2 and self.messages[first + 1]["role"] != "user" else 1
            del self.messages[first:first + drop]
            dropped += drop
        if dropped:
            self._note(f"(context window full: dropped the {dropped} oldest message{'s' * (dropped > 1)})")
        return n_prompt if n_prompt < llm.n_ctx() else None

    def answer(self, user_text: str) -> None:
        llm = self.llm
        self.messages.append({"role": "user", "content": user_text})
        n_prompt = self._shift_context()
        if n_prompt is None:
            need = len(llm.chat_tokens(self.messages))
            self.messages.pop()
            self._note(f"context window full: this message needs {need} tokens, the window holds "
                       f"{llm.n_ctx()}. Use a larger --ctx, or /reset to start a new conversation.")
            return
        parts, finish = [], None
        t0 = time.perf_counter()
        try:
            with sigint_cancels(llm):
                for chunk in llm.create_chat_completion(self.messages, stream=True, **self.sampling):
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content")
                    if text:
                        parts.append(text)
                        self.stdout.write(text)
                    if choice["finish_reason"] and finish is None:
                        # end the answer's line before a verbose timing line is printed
                        self.stdout.write("\n")
                    finish = choice["finish_reason"] or finish
                    self.stdout.flush()
        except ContextFullError as e:
            self.messages.pop()
            self._note(f"{e}. Type /reset to start a new conversation.")
            return
        if finish is None:
            self.stdout.write("\n")
            self.stdout.flush()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        t = llm.last_timings
        n_gen, t_gen = t.get("n_gen", 0), t.get("t_gen", time.perf_counter() - t0)
        rate = n_gen / t_gen if t_gen > 0 else 0.0
        self._note(f"[prompt {t.get('n_prompt', n_prompt)} tokens: {t.get('n_prompt_eval', 0)} evaluated, "
                   f"{t.get('n_prompt_reused', 0)} cached | answer {n_gen} tokens, {rate:.1f} tok/s]")
        if finish == "cancelled":
            self._note("(answer stopped)")
        elif finish == "length" and llm.n_cached >= llm.n_ctx():
            self._note("context window full: the answer was cut; the oldest turns make room for the next one.")
